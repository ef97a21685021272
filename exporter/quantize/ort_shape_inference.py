"""ONNX Runtime 1.32 `quantize_dynamic`'s two shape inferences, without sending the weights through files.

Why: `quantize_dynamic` infers shapes twice, and each time the whole model goes through disk and protobuf:
first on its input (`load_model_with_shape_infer`: `infer_shapes_path` writes an inferred copy of the file,
`onnx.load` reads it back), again after `ONNXQuantizer` replaced Gemms by MatMuls
(`save_and_reload_model_with_shape_infer`: deepcopy, save with external data, `infer_shapes_path`, load with
the external data). On the 45M Llama the inference itself takes ~3 ms; moving its 221 MB of weights took
~1.5 s of the CPU INT8 file's ~3.3 s build (cProfile of the child).

Here shapes are inferred on a copy whose initializers of >= 1024 bytes (`sys.getsizeof` of their raw data:
`onnx.save_model`'s external-data rule, the one ORT's reload uses) are marked external and hold no data; the
inferred model then gets those tensors back. The copy is inferred in strict mode: a node whose inference
needs a detached tensor's data fails ("Cannot parse data from external tensors"), and any failure sends the
model to ONNX Runtime's own file round trip, so shapes are only ever taken from an inference that read no
detached data, i.e. the one ORT would have run on the file. Two replacements:
- `reload_with_shape_infer` for `onnx_quantizer.save_and_reload_model_with_shape_infer` (after the Gemm
  replacement): ORT's result, whose onnx.load leaves each reloaded tensor with `data_location` DEFAULT set
  and no `external_data` entries: so are the restored tensors here.
- `load_with_shape_infer` for `quantize.save_and_reload_model_with_shape_infer` (`quantize_dynamic` given a
  ModelProto): the result of `load_model_with_shape_infer` on the model saved as one file (tensors exactly
  as given), not ORT's own ModelProto path. exporter/quantize/cpu_int8.py's `build` passes the model in
  memory where it would otherwise pass that file, so the quantized file stays byte-identical
  (tests/test_ort_shape_inference.py compares each inference's whole model, and whole quantized files).
  It adds ORT's "onnx.infer" tag as ORT's load does, so `BaseQuantizer` (whose own name is not patched)
  does not infer again.
A model with tensors already external goes to ORT's own functions. `install` patches only the ONNX Runtime
versions whose quantize.py / onnx_quantizer.py / quant_utils.py this was read from (`TESTED_VERSIONS`), and
only BackgroundBuild's child installs it.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import _get_initializer_tensors

from exporter.export.external_data import holds_external_data

TESTED_VERSIONS = ("1.32.",)
EXTERNAL_SIZE_THRESHOLD = 1024  # onnx.save_model's default size_threshold, which ORT's reload uses

calls: Counter[str] = Counter()  # inferences per path in this process: "in memory" / "onnxruntime"


def install() -> bool:
    """Make `quantize_dynamic` infer shapes with `load_with_shape_infer` / `reload_with_shape_infer` in this
    process, if ONNX Runtime's version is one in `TESTED_VERSIONS`; False (ORT untouched) otherwise. Idempotent."""
    import onnxruntime

    quantize, onnx_quantizer = _modules()
    if not onnxruntime.__version__.startswith(TESTED_VERSIONS):
        return False
    quantize.save_and_reload_model_with_shape_infer = load_with_shape_infer
    onnx_quantizer.save_and_reload_model_with_shape_infer = reload_with_shape_infer
    return True


def installed() -> bool:
    """Whether `quantize_dynamic(ModelProto)` gives, in this process, the file `quantize_dynamic(path)` gives."""
    quantize, _ = _modules()
    return quantize.save_and_reload_model_with_shape_infer is load_with_shape_infer


def _modules() -> tuple[Any, Any]:
    """ORT's quantize.py and onnx_quantizer.py modules (`onnxruntime.quantization.quantize` as an attribute is
    the function `quantize`, not its module)."""
    return (
        importlib.import_module("onnxruntime.quantization.quantize"),
        importlib.import_module("onnxruntime.quantization.onnx_quantizer"),
    )


def summary() -> str:
    """Which path inferred shapes how many times in this process (for the child's log)."""
    return f"shape inference: {calls['in memory']} in memory, {calls['onnxruntime']} by ONNX Runtime's files"


def load_with_shape_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """`quant_utils.load_model_with_shape_infer` of `model` saved as one file (no external data)."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata, load_model_with_shape_infer

    detached = _infer_detached(model)
    if detached is None:
        calls["onnxruntime"] += 1
        with tempfile.TemporaryDirectory(prefix="export-engine-shapes-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path))
            return load_model_with_shape_infer(path)
    result, pairs = detached
    for restored, tensor in pairs:
        restored.CopyFrom(tensor)  # as the file held it (inference never changes initializers)
    add_infer_metadata(result)
    calls["in memory"] += 1
    return result


def reload_with_shape_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """`quant_utils.save_and_reload_model_with_shape_infer(model)`."""
    from onnxruntime.quantization.quant_utils import (
        add_infer_metadata,
        save_and_reload_model_with_shape_infer,
    )

    detached = _infer_detached(model)
    if detached is None:
        calls["onnxruntime"] += 1
        # ORT's own function: `install` replaced the name in other modules, not this one
        return save_and_reload_model_with_shape_infer(model)
    result, pairs = detached
    for restored, tensor in pairs:
        restored.CopyFrom(tensor)
        # what onnx.load's load_external_data_for_tensor sets on a tensor it read back
        restored.data_location = onnx.TensorProto.DEFAULT
        del restored.external_data[:]
    add_infer_metadata(result)
    calls["in memory"] += 1
    return result


def _infer_detached(
    model: onnx.ModelProto,
) -> tuple[onnx.ModelProto, list[tuple[onnx.TensorProto, onnx.TensorProto]]] | None:
    """Shapes inferred (strict mode) on a copy of `model` whose large initializers are external without data:
    the inferred copy and its (detached tensor, original tensor) pairs; None if `model` already has external
    tensors or the strict inference failed."""
    if holds_external_data(model):
        return None
    light = onnx.ModelProto()
    light.CopyFrom(model)
    detached = []
    for index, tensor in enumerate(_get_initializer_tensors(light)):
        if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= EXTERNAL_SIZE_THRESHOLD:
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", "detached.data"  # never read: strict mode fails first
            detached.append(index)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=True)
    except Exception:  # any failure: ORT's own file round trip decides, and raises if it must
        return None
    originals = list(_get_initializer_tensors(model))
    copies = list(_get_initializer_tensors(inferred))
    if [t.name for t in copies] != [t.name for t in originals]:
        return None  # not expected (inference leaves initializers alone): ORT's own path then
    return inferred, [(copies[i], originals[i]) for i in detached]
