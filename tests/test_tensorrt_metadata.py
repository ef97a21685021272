"""Engine metadata, refusing foreign engines, and parsing TensorRT's sparse-layer log lines."""

from __future__ import annotations

import json

import pytest

from engines.tensorrt.builder import GpuInfo, check_engine_compat, engine_metadata, profiles_from_shapes
from engines.tensorrt.log import parse_sparsity_log
from engines.tensorrt.metadata import metadata_path_for, read_metadata, write_metadata
from export_errors import InputError

A100 = GpuInfo("NVIDIA A100-SXM4-40GB", "8.0")
PROFILE = profiles_from_shapes("input_ids:1x1", "input_ids:8x128", "input_ids:32x512")


def _metadata(trt_version: str = "10.13.0.35", gpu: GpuInfo = A100) -> dict:  # type: ignore[type-arg]
    return engine_metadata(
        trt_version=trt_version,
        gpu=gpu,
        profiles=[PROFILE],
        precision="int8+fp16",
        strongly_typed=True,
        sparse_weights=True,
    )


def test_metadata_round_trips_beside_the_plan(tmp_path) -> None:  # type: ignore[no-untyped-def]
    plan = tmp_path / "model.plan"
    path = write_metadata(plan, _metadata())
    assert path == metadata_path_for(plan) == tmp_path / "model.plan.json"
    data = read_metadata(plan)
    assert data["tensorrt_version"] == "10.13.0.35" and data["compute_capability"] == "8.0"
    assert data["profiles"] == [{"input_ids": {"min": [1, 1], "opt": [8, 128], "max": [32, 512]}}]
    assert data["precision"] == "int8+fp16" and json.loads(path.read_text()) == data


def test_missing_or_broken_metadata_is_an_input_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="no engine metadata"):
        read_metadata(tmp_path / "model.plan")
    (tmp_path / "model.plan.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_metadata(tmp_path / "model.plan")


def test_same_release_and_gpu_is_accepted() -> None:
    check_engine_compat(_metadata(), "10.13.0.99", A100)  # the build number may differ


@pytest.mark.parametrize(
    ("trt_version", "gpu", "message"),
    [
        ("10.14.0.1", A100, "built with TensorRT 10.13.0.35, this machine has TensorRT 10.14.0.1"),
        ("11.0.0.114", A100, "rebuild it here"),
        (
            "10.13.0.35",
            GpuInfo("NVIDIA L4", "8.9"),
            "built on NVIDIA A100-SXM4-40GB \\(compute capability 8.0\\)",
        ),
        ("10.13.0.35", GpuInfo("NVIDIA A100-PCIE-40GB", "8.0"), "this GPU is NVIDIA A100-PCIE-40GB"),
    ],
)
def test_foreign_engines_are_refused(trt_version: str, gpu: GpuInfo, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        check_engine_compat(_metadata(), trt_version, gpu, where="out/model.plan")
    assert info.value.where == "out/model.plan"


def test_sparsity_log_lines_are_parsed() -> None:
    log = [
        "Detected 2 inputs and 1 output network tensors.",
        "(Sparsity) Layers eligible for sparse math: /encoder/layer.0/MatMul, Conv_3 + Relu_4, /fc/MatMul",
        "(Sparsity) TRT inference plan picked sparse implementation for layers: Conv_3 + Relu_4",
    ]
    report = parse_sparsity_log(log)
    assert report.eligible == ["/encoder/layer.0/MatMul", "Conv_3 + Relu_4", "/fc/MatMul"]
    assert report.picked == ["Conv_3 + Relu_4"]
    assert report.eligible_not_picked == ["/encoder/layer.0/MatMul", "/fc/MatMul"]


def test_sparsity_log_with_nothing_picked() -> None:
    report = parse_sparsity_log(
        [
            "[I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_51",
            "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:",
        ]
    )
    assert report.to_json() == {"eligible": ["MatMul_51"], "picked": [], "eligible_not_picked": ["MatMul_51"]}
    assert parse_sparsity_log(["no sparsity here"]).to_json()["eligible"] == []
