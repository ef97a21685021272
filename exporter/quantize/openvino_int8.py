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

**Time.** NNCF's run is mostly Python graph handling on one core, and the export's INT8 stage spends
seconds on one core too (SmoothQuant's and the ranges' statistics): the export starts NNCF in a forked
process as soon as its inputs exist (`start_nncf`) and collects the file when the INT8 stage ends, before
anything is timed (README "Export speed" has the measurements). NNCF gets the weights as external data,
its supported path for large models: it copies and shape-infers the model about ten times, each time
serializing every weight, and with the weights in a file those copies hold the graph only (same file).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from exporter.export.external_data import save_onnx
from exporter.quantize.embeddings import quantize_embeddings

logger = logging.getLogger(__name__)

OPENVINO_FILE = "model.int8.openvino.onnx"
# NNCF's bias correction after quantization (its "fast" variant: a sub-model run per layer with a bias).
BIAS_CORRECTION = True
# Niceness of the process that runs NNCF beside the export (`NncfJob`): it takes the cores the export leaves
# idle and yields where the export uses both.
CHILD_NICENESS = 19


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
    calibrated on `samples` (feeds, each a batch); NNCF's ONNX backend writes standard Q/DQ ONNX. The
    weights reach NNCF as external data (module docstring: same result, a fraction of the copying)."""
    import nncf
    from nncf.onnx.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    with tempfile.TemporaryDirectory(prefix="nncf-") as tmp:
        model, folder = _weights_outside(fp32_path, Path(tmp))
        names = {i.name for i in model.graph.input}
        feeds = [{k: v for k, v in batch.items() if k in names} for batch in samples]
        advanced = AdvancedQuantizationParameters(
            disable_bias_correction=not BIAS_CORRECTION,
            backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(folder)},
        )
        # NNCF draws progress bars on the console; the export's console is its own
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return nncf.quantize(
                model,
                nncf.Dataset(feeds),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(feeds),
                advanced_parameters=advanced,
            )


def _weights_outside(fp32_path: Path, tmp: Path) -> tuple[onnx.ModelProto, Path]:
    """The graph at `fp32_path` without its weights' bytes (tensors over 1 KiB as external data, where NNCF
    reads them by file name) and the absolute folder holding them: the model's own data file where it
    has one, else one written to `tmp`. Small tensors (shapes, axes) stay inline for shape inference."""
    model = onnx.load(str(fp32_path), load_external_data=False)
    if any(uses_external_data(t) for t in model.graph.initializer):
        return model, fp32_path.parent.resolve()
    path = tmp / fp32_path.name
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    return onnx.load(str(path), load_external_data=False), tmp.resolve()


class NncfJob:
    """NNCF's recipe writing the OpenVINO INT8 file in a forked process while the export goes on
    (`start_nncf`); `result()` waits for it. Only the report section comes back through the pipe: the
    child writes the file itself."""

    def __init__(self, fp32_path: Path, samples: Sequence[Mapping[str, np.ndarray]], out: Path) -> None:
        self.fp32_path, self.out = fp32_path, out
        context = multiprocessing.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_nncf_child, args=(send, fp32_path, samples, out), name="nncf", daemon=True
        )
        self._process.start()
        send.close()  # the child holds the only sending end: EOF here when it dies without a word

    def result(self) -> dict[str, Any]:
        """{"seconds", "tables", "version"} once the file is written; raises `NncfUnavailable` when NNCF
        does not import there, RuntimeError with NNCF's one-line message when it failed or when the process
        died without a result."""
        try:
            status, payload = self._receive.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(
                f"NNCF's process ended without a result (exit code {self._process.exitcode})"
            ) from None
        finally:
            self._receive.close()
        self._process.join()
        if status == "unavailable":
            raise NncfUnavailable(payload)
        if status != "ok":
            raise RuntimeError(payload)
        return payload

    def cancel(self) -> None:
        """Stop the child (the export failed before collecting the file) and reap it."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._receive.close()


class NncfUnavailable(Exception):
    """NNCF did not import in the forked process (the message says why, with the remedy)."""


def start_nncf(fp32_path: Path, samples: Sequence[Mapping[str, np.ndarray]], out: Path) -> NncfJob | None:
    """NNCF's recipe for `out`, started in a forked process (Linux), which imports NNCF itself (0.7 s
    that the export does not wait for); None where NNCF is not installed or the platform cannot fork
    (then `build_openvino_file` runs it in this process, or says why not)."""
    if importlib.util.find_spec("nncf") is None or not sys.platform.startswith("linux") or not samples:
        return None
    return NncfJob(fp32_path, samples, out)


def _nncf_child(
    send: Connection, fp32_path: Path, samples: Sequence[Mapping[str, np.ndarray]], out: Path
) -> None:
    """The forked process: write `out` by NNCF's recipe; send ("ok", {seconds, tables, version}),
    ("unavailable", why) or ("error", NNCF's first line)."""
    try:
        reason = nncf_unavailable_reason()
        if reason is not None:
            send.send(("unavailable", reason))
            return
        import nncf

        os.nice(CHILD_NICENESS)
        _one_thread_sessions()
        start = time.perf_counter()
        model = nncf_ptq(fp32_path, samples)
        seconds = time.perf_counter() - start
        model, tables = quantize_embeddings(model)
        save_onnx(model, out)
        cpu = os.times()
        done = {"seconds": seconds, "cpu_s": cpu.user + cpu.system, "version": nncf.__version__}
        send.send(("ok", {**done, "tables": [t.to_json() for t in tables]}))
    except BaseException as exc:  # NNCF raises many kinds; the parent falls back to the Q/DQ recipe
        send.send(("error", _first_line(exc)))
    finally:
        send.close()


def _one_thread_sessions() -> None:
    """In the forked process only: NNCF's ONNX Runtime sessions (its statistics and bias-correction runs,
    small batches) on one thread without spinning. ONNX Runtime's default, a thread per core that spins
    while it waits for work, would spin on the core the export's own work runs on (measured on the demo,
    2 cores: NNCF alone 4.7 s wall / 6.0 s CPU with the default, 5.2 s / 5.2 s on one thread)."""
    import types

    import onnxruntime as ort

    try:
        import nncf.onnx.engine as engine
    except ImportError:  # another NNCF layout: its sessions keep ONNX Runtime's defaults
        return
    if getattr(engine, "rt", None) is not ort:
        return

    def options() -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    engine.rt = types.SimpleNamespace(SessionOptions=options, InferenceSession=ort.InferenceSession)  # type: ignore[attr-defined]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def build_openvino_file(
    qdq_path: Path,
    out: Path,
    *,
    fp32_path: Path | None = None,
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    job: NncfJob | None = None,
) -> dict[str, Any]:
    """Write the OpenVINO INT8 file to `out`; returns the report section. With `fp32_path` (the compact fp32
    graph) and calibration `samples`, NNCF's recipe where NNCF imports (from `job` where one was started:
    its result, else run here); otherwise (or if NNCF fails) the Q/DQ file at `qdq_path`, rewritten."""
    if job is not None:
        if job.out != out:
            raise ValueError(f"the NNCF job writes {job.out}, not {out}")
        why_not_nncf = None
    elif fp32_path is None or not samples:
        why_not_nncf = (
            "no fp32 graph and calibration samples given (KV-cache decoders keep the Q/DQ-derived file)"
        )
    else:
        why_not_nncf = nncf_unavailable_reason()
    if why_not_nncf is None:
        start = time.perf_counter()
        try:
            if job is not None:
                fp32_path = job.fp32_path
                done = job.result()
            else:
                assert fp32_path is not None and samples
                import nncf

                model = nncf_ptq(fp32_path, samples)
                seconds = time.perf_counter() - start
                model, quantized = quantize_embeddings(model)
                save_onnx(model, out)
                done = {
                    "seconds": seconds,
                    "tables": [t.to_json() for t in quantized],
                    "version": nncf.__version__,
                }
        except NncfUnavailable as exc:
            why_not_nncf = str(exc)
        except Exception as exc:  # NNCF raises many kinds; the Q/DQ recipe still serves
            why_not_nncf = f"nncf.quantize failed: {_first_line(exc)}"
            logger.warning("OpenVINO INT8 file: %s; using the Q/DQ-derived recipe", why_not_nncf)
        else:
            logger.info("OpenVINO INT8 file: NNCF's transformer recipe (%.1f s)", done["seconds"])
            return {
                "file": out.name,
                "from": fp32_path.name,
                "recipe": "nncf",
                "nncf_version": done["version"],
                "nncf_seconds": done["seconds"],
                **(
                    {
                        "ran": "in a forked process beside the graph passes and the INT8 stage",
                        "process_cpu_s": done["cpu_s"],
                        "waited_s": time.perf_counter() - start,
                    }
                    if job is not None
                    else {}
                ),
                "scheme": (
                    "NNCF post-training quantization, transformer preset (SmoothQuant, asymmetric 8-bit "
                    "activations, per-channel symmetric s8 weights"
                    + (", fast bias correction" if BIAS_CORRECTION else ", no bias correction")
                    + ") on the compact fp32 graph, the export's calibration samples"
                ),
                "embeddings": done["tables"],
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
