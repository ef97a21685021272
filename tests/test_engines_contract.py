"""One contract for every runner: specs, outputs vs a numpy reference, exact validation messages,
context-manager behaviour, nothing touched before `__enter__`. Parametrized over every backend;
the TensorRT case skips here with the reason (no TensorRT, no GPU) and runs on a GPU machine; the
OpenVINO case skips with its reason where OpenVINO is not installed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines import load_runner
from engines.base import Runner
from engines.openvino_runner import openvino_unavailable_reason
from engines.selection import tensorrt_skip_reason
from export_errors import InputError
from exporter.validate.tolerances import tolerance

FEATURES = 4
TRT_SKIP = tensorrt_skip_reason()
OV_SKIP = openvino_unavailable_reason()
WEIGHT = np.random.default_rng(0).normal(size=(FEATURES, 3)).astype(np.float32)


def _model() -> onnx.ModelProto:
    """y = x @ W + ids[..., None]  (float32 [batch, sequence, 4], int64 [batch, sequence])."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="xw"),
        helper.make_node("Cast", ["ids"], ["ids_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axis"], ["ids_3d"], name="unsqueeze"),
        helper.make_node("Add", ["xw", "ids_3d"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "contract",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", FEATURES]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 3])],
        [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(np.array([-1], np.int64), "axis")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
    return feeds["x"] @ WEIGHT + feeds["ids"][..., None].astype(np.float32)


def _feeds(batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x": rng.normal(size=(batch, seq, FEATURES)).astype(np.float32),
        "ids": rng.integers(0, 10, size=(batch, seq)).astype(np.int64),
    }


def _write_onnx(directory: Path) -> Path:
    path = directory / "model.onnx"
    onnx.save(_model(), path)
    return path


def _write_plan(directory: Path) -> Path:
    from engines.tensorrt.builder import TensorRTBuildConfig, build_engine, profiles_from_shapes

    profile = profiles_from_shapes("x:1x1x4,ids:1x1", "x:2x5x4,ids:2x5", "x:4x16x4,ids:4x16")
    config = TensorRTBuildConfig(profiles=(profile,), fp16=False)
    return build_engine(_write_onnx(directory), directory / "model.plan", config).plan_path


BACKENDS = [
    pytest.param(("onnxruntime", _write_onnx), id="onnxruntime"),
    pytest.param(
        ("openvino", _write_onnx),
        id="openvino",
        marks=pytest.mark.skipif(OV_SKIP is not None, reason=f"OpenVINO: {OV_SKIP}"),
    ),
    pytest.param(
        ("tensorrt", _write_plan),
        id="tensorrt",
        marks=[pytest.mark.gpu, pytest.mark.skipif(TRT_SKIP is not None, reason=f"TensorRT: {TRT_SKIP}")],
    ),
]


@pytest.fixture(params=BACKENDS)
def artifact(request, tmp_path) -> tuple[str, Path]:  # type: ignore[no-untyped-def]
    backend, write = request.param
    return backend, write(tmp_path)


@pytest.fixture
def runner(artifact) -> Runner:  # type: ignore[no-untyped-def]
    backend, path = artifact
    with load_runner(path, backend=backend, threads=1) as active:
        yield active


def test_specs(runner: Runner) -> None:
    inputs = {spec.name: spec for spec in runner.input_specs}
    assert set(inputs) == {"x", "ids"}
    assert inputs["x"].dtype == np.float32 and inputs["ids"].dtype == np.int64
    assert len(inputs["x"].shape) == 3 and inputs["x"].shape[2] == FEATURES
    assert all(isinstance(d, str) for d in inputs["x"].shape[:2])  # dynamic axes are named
    assert [(s.name, s.dtype, len(s.shape)) for s in runner.output_specs] == [("y", np.float32, 3)]


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (2, 5), (3, 11)])
def test_outputs_match_the_reference(runner: Runner, batch: int, seq: int) -> None:
    feeds = _feeds(batch, seq)
    outputs = runner.infer(feeds)
    assert set(outputs) == {"y"} and outputs["y"].shape == (batch, seq, 3)
    err = np.abs(outputs["y"] - _reference(feeds))
    assert err.max() <= tolerance("fp32").max_abs, (
        f"max abs error {err.max()} at {np.unravel_index(err.argmax(), err.shape)}"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: {"x": f["x"]}, r"missing input\(s\) \['ids'\]; expected \['ids', 'x'\]"),
        (lambda f: {**f, "z": f["x"]}, r"unknown input\(s\) \['z'\]"),
        (lambda f: {**f, "x": f["x"].astype(np.float64)}, "input 'x' has dtype float64, expected float32"),
        (lambda f: {**f, "ids": f["ids"].astype(np.int32)}, "input 'ids' has dtype int32, expected int64"),
        (lambda f: {**f, "x": f["x"][0]}, r"input 'x' has rank 2 \(5, 4\)"),
        (lambda f: {**f, "x": np.zeros((2, 5, 7), np.float32)}, "input 'x' axis 2 is 7, expected 4"),
    ],
)
def test_feed_validation_messages(
    runner: Runner, change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], message: str
) -> None:
    with pytest.raises(InputError, match=message) as info:
        runner.infer(change(_feeds()))
    assert info.value.where == "feeds"


def test_context_manager(artifact) -> None:  # type: ignore[no-untyped-def]
    backend, path = artifact
    runner = load_runner(path, backend=backend)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(_feeds())
    with runner as active:
        assert active is runner
        first = active.infer(_feeds())["y"]
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(_feeds())
    with runner:  # re-entering loads again and gives the same numbers
        np.testing.assert_array_equal(runner.infer(_feeds())["y"], first)


def test_nothing_is_touched_before_enter(artifact, tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend, path = artifact
    later = tmp_path / "later" / path.name
    runner = load_runner(later, backend=backend)  # the file does not exist yet: no error
    with pytest.raises(RuntimeError, match="after __enter__"):
        runner.input_specs  # noqa: B018
    with pytest.raises(InputError, match="no such") as info:
        runner.__enter__()
    assert info.value.where == str(later)
    later.parent.mkdir()
    later.write_bytes(path.read_bytes())
    if path.with_name(path.name + ".json").is_file():  # the TensorRT metadata travels with the plan
        later.with_name(later.name + ".json").write_bytes(path.with_name(path.name + ".json").read_bytes())
    with runner:
        assert runner.infer(_feeds())["y"].shape == (2, 5, 3)


@pytest.mark.gpu
@pytest.mark.skipif(TRT_SKIP is not None, reason=f"TensorRT: {TRT_SKIP}")
def test_tensorrt_refuses_shapes_outside_the_profile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with (
        load_runner(_write_plan(tmp_path)) as runner,
        pytest.raises(InputError, match=r"input 'x' has shape \(5, 5, 4\), outside the engine's profile"),
    ):
        runner.infer(_feeds(batch=5))


def test_open_together_activates_every_runner_and_returns_the_failures() -> None:
    """engines.base.open_together: runners activated on worker threads, the active ones closed by the
    stack, a failed activation returned (not raised) in its runner's place."""
    import contextlib

    from engines.base import Runner, open_together

    events: list[str] = []

    class Fake(Runner):
        def __init__(self, name: str, fails: bool = False) -> None:
            super().__init__()
            self.name, self.fails = name, fails

        def _activate(self) -> None:
            if self.fails:
                raise RuntimeError(f"{self.name} cannot load")
            events.append(f"open {self.name}")

        def _deactivate(self) -> None:
            events.append(f"close {self.name}")

        def _infer(self, feeds):  # type: ignore[no-untyped-def]
            return {}

    runners = [Fake("a"), Fake("b", fails=True), Fake("c")]
    with contextlib.ExitStack() as stack:
        errors = open_together(runners, stack)
        assert [type(e).__name__ if e else None for e in errors] == [None, "RuntimeError", None]
        assert str(errors[1]) == "b cannot load"
        assert sorted(events) == ["open a", "open c"]
    assert sorted(events[2:]) == ["close a", "close c"]
