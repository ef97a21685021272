"""engines/onnx_inputs.read_io: a file's graph I/O (and initializer names) without parsing its weights,
giving the same specs as a full `onnx.load`, for inline weights, external data, initializers listed as
graph inputs, and an empty file; a truncated file raises."""

from __future__ import annotations

import graph_models as gm
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from engines.onnx_inputs import onnx_input_specs, onnx_output_specs, read_io


def _specs(model: onnx.ModelProto):
    return onnx_input_specs(model), onnx_output_specs(model)


@pytest.mark.parametrize("build", [gm.bert_onnx, gm.llama_onnx, gm.decomposed_layernorm_graph])
def test_same_specs_as_a_full_load(build, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build(), str(path))
    light = read_io(path)
    assert _specs(light) == _specs(onnx.load(str(path)))
    assert not any(init.raw_data or init.float_data for init in light.graph.initializer)  # names only


def test_initializers_listed_as_inputs_are_not_inputs(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    inputs, outputs = _specs(read_io(path))
    assert [s.name for s in inputs] == ["x"] and inputs[0].shape == ("batch", 4)
    assert (inputs, outputs) == _specs(onnx.load(str(path)))


def test_external_data_and_empty_and_truncated_files(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(
        gm.bert_onnx(), str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    assert _specs(read_io(path)) == _specs(onnx.load(str(path), load_external_data=False))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert _specs(read_io(empty)) == ([], [])
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(path.read_bytes()[:-7])
    with pytest.raises((ValueError, IndexError)):
        read_io(truncated)
