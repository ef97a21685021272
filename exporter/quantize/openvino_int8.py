"""`model.int8.openvino.onnx`: the INT8 file OpenVINO runs, by one of two recipes.

**NNCF's recipe, where `nncf` is installed** (`pip install "export-engine[nncf]"`; encoders): Intel's
post-training quantization (`nncf.quantize`, `ModelType.TRANSFORMER`: SmoothQuant alpha 0.95 on the
MatMuls, asymmetric 8-bit activations for the MatMuls with a weight and symmetric for the attention's
activation x activation MatMul, per-channel symmetric s8 weights, the softmax -> MatMul input left float,
fast bias correction) run by its ONNX backend on our compact fp32 graph with the export's own calibration
samples. Measured on the demo export (README "CPU engine"): more accurate than the TensorRT-derived file
(mean token cosine 0.9983 vs 0.9922) and as fast or faster on OpenVINO, on a Sapphire Rapids (AMX) Xeon
and an Emerald Rapids Xeon without AMX. The TensorRT file cannot take this recipe: TensorRT wants symmetric
s8 activations. NNCF stays an optional extra (its dependencies: scipy, scikit-learn, networkx, ...; and it
sends usage telemetry unless opted out); where it is missing, or fails, the recipe below is used and the
report says why.

**The TensorRT Q/DQ file, rewritten where OpenVINO runs it better** (always available):

OpenVINO runs our TensorRT-style Q/DQ file with INT8 kernels (its low-precision transformations turn
each Q/DQ pair into an INT8 layer), faster than ONNX Runtime runs its own CPU INT8 file. Two things in
that file are there for TensorRT and cost OpenVINO time or size (README "CPU engine", measured):

- Layers the sensitivity search kept in high precision (TensorRT runs them in fp16) are fp32 GEMMs on
  OpenVINO's CPU plugin: on the demo 3 of 36 layers took 17% of the time at 8x128. Here their weights
  become per-channel INT8 behind a `DequantizeLinear` with float activations (weight-only), which
  OpenVINO compiles into a compressed-weight FullyConnected: activations stay float, so the accuracy
  that made the search keep them is kept.
- The embedding tables are fp32 (exporter/quantize/embeddings.py makes them INT8 per row).

Everything else is byte for byte the Q/DQ file's arithmetic. The file is judged like every CPU
candidate, by OpenVINO itself on the export's validation inputs (engines/cpu_selection.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.export.external_data import save_onnx
from exporter.quantize.embeddings import quantize_embeddings

logger = logging.getLogger(__name__)

OPENVINO_FILE = "model.int8.openvino.onnx"


def weight_only_int8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """MatMuls whose weight (input 1) is a 2-D fp32 initializer read by nothing else get per-output-channel
    symmetric INT8 weights behind a DequantizeLinear (axis 1); returns the model and the nodes changed."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    changed: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (
            weight is None
            or weight.data_type != TensorProto.FLOAT
            or len(weight.dims) != 2
            or readers[weight.name] != 1
        ):
            nodes.append(node)
            continue
        fp32 = numpy_helper.to_array(weight)
        scale = np.abs(fp32).max(axis=0).astype(np.float32) / np.float32(127.0)
        scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
        q = np.clip(np.rint(fp32 / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(weight)
        q_name, s_name, deq = weight.name + "_w8", weight.name + "_w8_scale", weight.name + "_w8_dequantized"
        graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [q_name, s_name], [deq], name=f"{node.name}_weight_dq", axis=1
            )
        )
        node.input[1] = deq
        nodes.append(node)
        changed.append(node.name)
    del graph.node[:]
    graph.node.extend(nodes)
    return model, changed


def nncf_unavailable_reason() -> str | None:
    """None when NNCF imports, else why not (one line, with the remedy)."""
    try:
        import nncf  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f'nncf does not import ({type(exc).__name__}: {exc}); pip install "export-engine[nncf]"'
    return None


def nncf_ptq(fp32_path: Path, samples: Sequence[Mapping[str, np.ndarray]]) -> onnx.ModelProto:
    """NNCF's post-training INT8 quantization (transformer preset) of the fp32 ONNX graph at `fp32_path`,
    calibrated on `samples` (feeds, each a batch); NNCF's ONNX backend writes standard Q/DQ ONNX."""
    import nncf

    model = onnx.load(str(fp32_path))
    names = {i.name for i in model.graph.input}
    feeds = [{k: v for k, v in batch.items() if k in names} for batch in samples]
    # NNCF draws progress bars on the console; the export's console is its own
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(
            model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds)
        )


def build_openvino_file(
    qdq_path: Path,
    out: Path,
    *,
    fp32_path: Path | None = None,
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Write the OpenVINO INT8 file to `out`; returns the report section. With `fp32_path` (the compact fp32
    graph) and calibration `samples`, NNCF's recipe where NNCF imports; otherwise (or if NNCF fails) the Q/DQ
    file at `qdq_path`, rewritten."""
    why_not_nncf = (
        "no fp32 graph and calibration samples given (KV-cache decoders keep the Q/DQ-derived file)"
        if fp32_path is None or not samples
        else nncf_unavailable_reason()
    )
    if why_not_nncf is None:
        assert fp32_path is not None and samples
        start = time.perf_counter()
        try:
            model = nncf_ptq(fp32_path, samples)
        except Exception as exc:  # NNCF raises many kinds; the Q/DQ recipe still serves
            why_not_nncf = (
                f"nncf.quantize failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
            )
            logger.warning("OpenVINO INT8 file: %s; using the Q/DQ-derived recipe", why_not_nncf)
        else:
            seconds = time.perf_counter() - start
            model, tables = quantize_embeddings(model)
            save_onnx(model, out)
            import nncf

            logger.info("OpenVINO INT8 file: NNCF's transformer recipe (%.1f s)", seconds)
            return {
                "file": out.name,
                "from": fp32_path.name,
                "recipe": "nncf",
                "nncf_version": nncf.__version__,
                "nncf_seconds": seconds,
                "scheme": (
                    "NNCF post-training quantization, transformer preset (SmoothQuant, asymmetric 8-bit "
                    "activations, per-channel symmetric s8 weights, fast bias correction) on the compact "
                    "fp32 graph, the export's calibration samples"
                ),
                "embeddings": [t.to_json() for t in tables],
            }
    model = onnx.load(str(qdq_path))
    model, weight_only = weight_only_int8(model)
    model, tables = quantize_embeddings(model)
    save_onnx(model, out)
    logger.info(
        "OpenVINO INT8 file: %d layers weight-only INT8, %d embedding tables INT8",
        len(weight_only),
        len(tables),
    )
    return {
        "file": out.name,
        "from": qdq_path.name,
        "recipe": "qdq",
        "why_not_nncf": why_not_nncf,
        "scheme": (
            "the Q/DQ file's static s8 activations x per-channel s8 weights; its high-precision layers as "
            "weight-only per-channel INT8 (float activations); embedding tables INT8 per row"
        ),
        "weight_only_int8": weight_only,
        "embeddings": [t.to_json() for t in tables],
    }
