"""The CPU-fast INT8 variant for ONNX Runtime: dynamic per-row u8 activations x per-channel s8 weights.

Why a second file: TensorRT needs symmetric s8 activations with static scales, but ONNX Runtime's CPU integer
GEMM is fast only for u8 activations x s8 weights (measured here: ~24x faster than s8 x s8), so the TensorRT
placement runs slower than fp32 on CPU. This variant uses ONNX Runtime's own dynamic quantization
(`quantize_dynamic`, per-channel s8 weights): activations are quantized to u8 at run time from their
actual range, which also removes the calibration error, and ORT executes DynamicQuantizeMatMul /
MatMulIntegerToFloat / QAttention integer kernels.

Optional ONNX Runtime transformer fusions (Attention, SkipLayerNorm, BiasGelu; `QuantConfig.cpu_fusion`) run
on the fp32 graph first, because their patterns no longer match once MatMuls are quantized; they are off by
default because the fused Attention/QAttention graph measured slower on this CPU than the unfused one. The
fused graph is checked against the plain one numerically and dropped if it disagrees.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

CPU_QUANT_OPS = ("MatMul", "Gemm", "Attention")
INTEGER_KERNELS = (
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
    "QLinearMatMul",
    "MatMulInteger",
    "QGemm",
    "DynamicQuantizeLinear",
)


def fuse_transformer(
    fp32_path: Path, out_path: Path, num_heads: int = 0, hidden_size: int = 0
) -> dict[str, int]:
    """ONNX Runtime's BERT-family fusions; op counts after. 0 heads/hidden: ORT detects them from the graph."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(fp32_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0
    )
    model.save_model_to_file(str(out_path))
    return dict(Counter(n.op_type for n in onnx.load(str(out_path), load_external_data=False).graph.node))


def candidates(model_path: Path | onnx.ModelProto) -> list[str]:
    """Nodes that dynamic quantization would quantize: MatMul/Gemm with a constant weight, fused Attention."""
    model = _graph_of(model_path)
    initializers = {i.name for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type == "Attention" or (
            node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in initializers
        ):
            if not node.name:
                raise ValueError(f"unnamed {node.op_type} node: cannot be excluded by name")
            names.append(node.name)
    return names


def layer_inputs(model_path: Path | onnx.ModelProto, names: list[str]) -> dict[str, dict[str, int | None]]:
    """Per candidate node: {activation input: None, weight input: per-channel axis} as quantize_dynamic
    quantizes them (MatMul/Attention weight [K, N]: axis 1; Gemm with transB: axis 0)."""
    model = _graph_of(model_path)
    wanted = set(names)
    layers: dict[str, dict[str, int | None]] = {}
    for node in model.graph.node:
        if node.name in wanted:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            layers[node.name] = {node.input[0]: None, node.input[1]: 0 if trans_b else 1}
    return layers


def _graph_of(model: Path | onnx.ModelProto) -> onnx.ModelProto:
    """The model as given, or read from its path (its nodes and initializer names are what is used)."""
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)


def build(
    model_path: Path,
    out_path: Path,
    excluded: frozenset[str],
    reduce_range: bool = False,
    strip_metadata: str | None = None,
) -> Path:
    """Dynamic INT8 (per-channel s8 weights, u8 per-row activations at run time) except `excluded` nodes.
    `reduce_range`: 7-bit weights, for CPUs whose u8 x s8 kernel saturates (exporter/quantize/cpu_features.py).
    `strip_metadata`: a node metadata key dropped from the input first (model.onnx's 2:4 sparsity tags: the
    CPU file does not carry them), written beside `out_path` and quantized from there."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from exporter.quantize import ort_shape_inference

    source: str | onnx.ModelProto | None = None
    if ort_shape_inference.installed():  # BackgroundBuild's child: the model in memory, same file out
        source = _in_memory_source(model_path, strip_metadata)
    if source is None and strip_metadata:
        source = str(_without_node_metadata(model_path, out_path.with_suffix(".source.onnx"), strip_metadata))

    quantize_dynamic(
        str(model_path) if source is None else source,
        str(out_path),
        op_types_to_quantize=list(CPU_QUANT_OPS),
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=sorted(excluded),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )
    return out_path


def _without_node_metadata(source: Path, out: Path, key: str) -> Path:
    """`source` with every node's metadata entry `key` removed, saved at `out`."""
    from exporter.export.external_data import save_onnx

    model = onnx.load(str(source))
    _drop_node_metadata(model, key)
    save_onnx(model, out)
    return out


def _drop_node_metadata(model: onnx.ModelProto, key: str) -> None:
    """Remove every node's metadata entry `key`, in place."""
    for node in model.graph.node:
        kept = [prop for prop in node.metadata_props if prop.key != key]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _in_memory_source(model_path: Path, strip_metadata: str | None) -> onnx.ModelProto | None:
    """The model `quantize_dynamic` would read from the file `build` gives it (`model_path`, or its copy
    without `strip_metadata` as `_without_node_metadata` saves it), when that file holds every weight
    inline: with exporter/quantize/ort_shape_inference.py installed, `quantize_dynamic` then writes the same
    file from the model in memory (no copy saved, no file inferred and read back). None when a file has
    external data (ORT reads it from its folder): `build` passes the path then."""
    from exporter.export.external_data import (
        EXTERNAL_DATA_THRESHOLD_BYTES,
        holds_external_data,
        initializer_bytes,
    )

    model = onnx.load(str(model_path), load_external_data=False)
    if holds_external_data(model):
        return None
    if strip_metadata:
        _drop_node_metadata(model, strip_metadata)
        # save_onnx writes a .data file above the threshold. The weights' bytes are distinct byte ranges of the
        # file read, so a file under it needs no count (counting copies every weight out: ~0.1 s for 221 MB).
        if (
            Path(model_path).stat().st_size > EXTERNAL_DATA_THRESHOLD_BYTES
            and initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
        ):
            return None
    return model


# glibc malloc settings for the child (the export's own: exporter/report/process.py): the quantizer allocates
# and frees the same weight-sized arrays over and over; with glibc's defaults each comes as fresh pages. Measured
# on the 45M Llama's model.onnx (Intel Xeon (Sapphire Rapids, AMX)): child 7.4 -> 5.7 s, system time 3.0 -> 1.5 s.
CHILD_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(512 * 2**20),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}


def child_environment() -> dict[str, str]:
    """This process's environment with `CHILD_MALLOC_ENV` added, unless the user tunes malloc already."""
    tuned = any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in os.environ)
    return dict(os.environ) if tuned else {**os.environ, **CHILD_MALLOC_ENV}


class BackgroundBuild:
    """`build(...)` in a child interpreter at low priority (`nice`), for the caller to overlap with its own work:
    ONNX Runtime's quantizer is single-threaded Python. `result()` waits; None if the child failed (its
    stderr goes to the log), and the caller builds in-process."""

    def __init__(
        self,
        model_path: Path,
        out_path: Path,
        excluded: frozenset[str],
        reduce_range: bool,
        strip_metadata: str | None = None,
    ) -> None:
        root = str(Path(__file__).resolve().parents[2])  # this checkout's packages, whatever the child's path
        # The child quantizes weights with exporter/quantize/per_channel_weights.py's vectorized copy of ONNX
        # Runtime's per-channel loop (same bytes, ~3 s less on the 45M Llama), infers shapes in memory
        # (exporter/quantize/ort_shape_inference.py: same bytes, no file round trips) and says on stderr which
        # paths ran.
        code = (
            "import json, os, sys; os.nice(10); sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from exporter.quantize import per_channel_weights as w, ort_shape_inference as s; w.install(); "
            "s.install(); from exporter.quantize.cpu_int8 import build; a = json.loads(sys.argv[1]); "
            "build(Path(a[0]), Path(a[1]), frozenset(a[2]), a[3], a[4]); "
            "print(w.summary(), s.summary(), sep='; ', file=sys.stderr)"
        )
        args = json.dumps([str(model_path), str(out_path), sorted(excluded), reduce_range, strip_metadata])
        self.out_path = out_path
        self._key = _build_key(model_path, excluded, reduce_range, strip_metadata)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by result() or close())
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, args, root],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=child_environment(),
        )

    def builds(
        self,
        model_path: Path,
        excluded: frozenset[str],
        reduce_range: bool,
        strip_metadata: str | None = None,
    ) -> bool:
        """Whether this child builds what `build(model_path, ..., excluded, reduce_range, strip_metadata)`
        would (a caller that started it early checks it is the build it needs)."""
        return self._key == _build_key(model_path, excluded, reduce_range, strip_metadata)

    def close(self) -> None:
        """Stop the child if it still runs (the caller failed before needing its file)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def result(self) -> Path | None:
        code = self.process.wait()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        self.log.close()
        if code != 0:
            logger.warning(
                "background INT8 CPU build failed (exit %d), building in-process: %s", code, text[-2000:]
            )
            return None
        if text:
            logger.info("background INT8 CPU build: %s", text[-2000:])
        return self.out_path


def integer_kernel_counts(model_path: Path, threads: int = 2) -> dict[str, int]:
    """Op counts of ONNX Runtime's *optimized* graph: proof that integer kernels (not fp32 MatMul) run."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {op: ops[op] for op in (*INTEGER_KERNELS, "MatMul", "Attention") if ops[op]}


def _build_key(
    model_path: Path, excluded: frozenset[str], reduce_range: bool, strip_metadata: str | None
) -> tuple[str, frozenset[str], bool, str | None]:
    return (str(Path(model_path).resolve()), frozenset(excluded), reduce_range, strip_metadata)
