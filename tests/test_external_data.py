"""Models over the protobuf limit export with ONNX external data: model.onnx + one model.onnx.data
beside it (not one file per tensor), loadable by onnx and ONNX Runtime from the folder, exact, and
deterministic. The 2 GB threshold is lowered here so tiny models take the large-model path; the real
~1B-parameter run is tools/bench_large_model.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.export import external_data
from exporter.export.torch_to_onnx import CausalLMForExport, export_to_onnx
from exporter.testing.synthetic import build_base_model, layer_param, row_mask
from exporter.validate.tolerances import tolerance


@pytest.fixture
def force_external(monkeypatch) -> None:
    monkeypatch.setattr(external_data, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)


def example() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run_onnxruntime(path: Path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def test_large_path_writes_one_data_file_and_stays_exact(force_external, tmp_path) -> None:
    wrapper = CausalLMForExport(build_base_model("llama")).eval()
    path = export_to_onnx(wrapper, example(), tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]

    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 2 * 7  # every projection of both layers, at least
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "model.onnx.data"
        assert int(info["offset"]) % external_data.ALIGNMENT == 0
    onnx.checker.check_model(str(path))  # resolves the data file from the model's folder

    with torch.no_grad():
        expected = wrapper(**example()).numpy()
    got = run_onnxruntime(path, example())
    err = np.abs(got - expected)
    assert err.max() <= tolerance("fp32").max_abs, (
        f"max abs err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    )


def test_large_path_is_deterministic(force_external, tmp_path) -> None:
    wrapper = CausalLMForExport(build_base_model("qwen2")).eval()
    first = export_to_onnx(wrapper, example(), tmp_path / "a" / "model.onnx")
    second = export_to_onnx(wrapper, example(), tmp_path / "b" / "model.onnx")
    for name in ("model.onnx", "model.onnx.data"):
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes(), name


def test_small_models_stay_in_one_file(tmp_path) -> None:
    wrapper = CausalLMForExport(build_base_model("llama")).eval()
    export_to_onnx(wrapper, example(), tmp_path / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_consolidate_packs_one_file_per_tensor_into_one(tmp_path) -> None:
    """The TorchScript exporter's own large-model layout (a file per tensor) becomes one data file."""
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(3)}
    small = np.arange(4, dtype=np.float32)  # below the inline threshold: stays in the proto
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in (1, 2)]
    nodes += [helper.make_node("Add", ["h2", "b"], ["y"])]
    initializers = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    initializers.append(numpy_helper.from_array(np.resize(small, 64), "b"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        initializers,
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(scratch / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=1024,
    )
    assert len(list(scratch.iterdir())) == 4  # the model and one file per large tensor

    out = tmp_path / "out"
    out.mkdir()
    external_data.consolidate_external_data(scratch / "m.onnx", out / "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    loaded = onnx.load(str(out / "model.onnx"))
    for tensor in loaded.graph.initializer:
        expected = weights.get(tensor.name, np.resize(small, 64))
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected)
    x = {"x": torch.from_numpy(rng.standard_normal((1, 64)).astype(np.float32))}
    want = x["x"].numpy() @ weights["w0"] @ weights["w1"] @ weights["w2"] + np.resize(small, 64)
    np.testing.assert_allclose(run_onnxruntime(out / "model.onnx", x), want, rtol=1e-4, atol=1e-4)


def test_external_data_outside_the_folder_is_refused(tmp_path) -> None:
    tensor = numpy_helper.from_array(np.zeros(512, dtype=np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../elsewhere.bin")
    with pytest.raises(ValueError, match="outside"), open(tmp_path / "data.bin", "wb") as data:
        external_data._copy_external(tensor, tmp_path, data, "data.bin")


def test_export_engine_end_to_end_with_external_data(force_external, model_dir_factory, tmp_path) -> None:
    model_dir = model_dir_factory(
        "llama", masks={layer_param("llama", 0, "gate"): row_mask((96, 64), range(9))}
    )
    out = tmp_path / "out"
    config = ExportConfig(precision="fp32", benchmark=False, sequence_length=32, validation_samples=4)
    result = export_engine(model_dir, out, config)
    names = sorted(p.name for p in out.iterdir())
    assert "model.onnx.data" in names
    for name in names:
        if name.endswith(".onnx"):
            model = onnx.load(str(out / name), load_external_data=False)
            locations = {
                e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
            }
            assert locations == {name + ".data"}, (name, locations)
        else:
            assert (
                name.endswith((".data", ".json", ".md")) or name == "export.log" or (out / name).is_dir()
            ), name
    assert all(c["max_abs"] <= 1e-4 for c in result.report["validation"]["onnx_fp32"])


def test_save_onnx_writes_one_fixed_name_data_file(force_external, tmp_path) -> None:
    wrapper = CausalLMForExport(build_base_model("llama")).eval()
    exported = export_to_onnx(wrapper, example(), tmp_path / "exported" / "model.onnx")
    expected = run_onnxruntime(exported, example())
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        external_data.save_onnx(onnx.load(str(exported)), tmp_path / run / "model.onnx")
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == ["model.onnx", "model.onnx.data"]
        np.testing.assert_array_equal(run_onnxruntime(tmp_path / run / "model.onnx", example()), expected)
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_save_onnx_keeps_small_models_in_one_file(tmp_path) -> None:
    wrapper = CausalLMForExport(build_base_model("llama")).eval()
    exported = export_to_onnx(wrapper, example(), tmp_path / "exported.onnx")
    external_data.save_onnx(onnx.load(str(exported)), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx.data").exists()
