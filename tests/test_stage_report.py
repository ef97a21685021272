"""The stage table: accuracy numbers, parameter and size counts, markdown shape, JSON and the PNG chart.

Stages: a PyTorch tiny encoder (reference), its fp32 ONNX twin and an INT8-table twin, timed
interleaved. No timing assertions: only that latencies are positive and finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from bench_models import HIDDEN, VOCAB, tiny_torch_encoder, write_tiny_encoder

from engines.benchmark import BenchConfig
from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.torch_runner import TorchRunner
from exporter.report import stage_report
from exporter.report.stage_report import StageInfo, StageResult
from exporter.validate.tolerances import tolerance

FAST = BenchConfig(warmup_ms=5, iterations=15, duration_s=0, avg_runs=5, percentiles=(90.0,))
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> list[StageResult]:
    folder = tmp_path_factory.mktemp("stages")
    fp32 = write_tiny_encoder(folder / "model.onnx")
    int8 = write_tiny_encoder(folder / "model.int8.onnx", quantized_table=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(2, 16))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feeds["attention_mask"][1, 10:] = 0
    torch_runner = TorchRunner(tiny_torch_encoder(), INPUTS, ["last_hidden_state"], threads=1)
    with torch_runner, OnnxRuntimeRunner(fp32, threads=1) as a, OnnxRuntimeRunner(int8, threads=1) as b:
        reference = torch_runner.infer(feeds)
        stages = [("pytorch", torch_runner), ("onnx fp32", a), ("onnx int8", b)]
        info = {"onnx int8": StageInfo(note="word table int8 (scale 1/40)")}
        return stage_report.measure_stages(stages, feeds, reference, info=info, config=FAST)


def test_accuracy_columns_tell_fp32_from_int8(measured: list[StageResult]) -> None:
    torch_row, fp32, int8 = measured
    assert torch_row.cosine == pytest.approx(1.0, abs=1e-12) and torch_row.max_abs_err == 0.0
    assert fp32.cosine == pytest.approx(1.0, abs=1e-7)
    assert fp32.max_abs_err is not None and fp32.max_abs_err <= tolerance("fp32").max_abs  # type: ignore[operator]
    # rounding to 1/40 steps: error up to 1/80 per element, visible but small
    assert int8.max_abs_err is not None and 1e-3 < int8.max_abs_err <= 1 / 80 + 1e-6
    assert int8.cosine is not None and 0.99 < int8.cosine < 1 - 1e-6


def test_params_sizes_and_latencies(measured: list[StageResult]) -> None:
    torch_row, fp32, int8 = measured
    assert torch_row.params == VOCAB * HIDDEN + 2 * HIDDEN and torch_row.file_bytes is None
    assert fp32.params == VOCAB * HIDDEN + 2 * HIDDEN + 1  # + the Unsqueeze axes initializer
    assert int8.params == VOCAB * HIDDEN + 2 * HIDDEN + 1 + 1  # + the scale
    assert fp32.path is not None and fp32.file_bytes == fp32.path.stat().st_size
    assert int8.file_bytes is not None and int8.file_bytes < fp32.file_bytes
    for row in measured:
        assert 0 < row.latency_median_ms <= row.latency_p90_ms < math.inf
    assert int8.note == "word table int8 (scale 1/40)"


def test_markdown_table_shape(measured: list[StageResult]) -> None:
    text = stage_report.render_markdown(measured)
    lines = text.splitlines()
    assert lines[0] == "| stage | params | file size | latency median | p90 | cosine | max abs err |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|"
    rows = [line for line in lines[2:5]]
    assert [r.split(" | ")[0] for r in rows] == ["| pytorch", "| onnx fp32", "| onnx int8"]
    assert all(r.count("|") == 8 for r in rows)
    assert "| — |" in rows[0]  # the PyTorch stage has no file
    assert "(1.00×)" in rows[0]
    assert lines[-1] == "- onnx int8: word table int8 (scale 1/40)"


def test_json_is_serializable_with_ratios(measured: list[StageResult]) -> None:
    doc = json.loads(json.dumps(stage_report.to_json(measured)))
    assert doc["reference_stage"] == "pytorch"
    assert [s["name"] for s in doc["stages"]] == ["pytorch", "onnx fp32", "onnx int8"]
    assert doc["stages"][0]["latency_ratio_to_first"] == 1.0
    assert doc["stages"][1]["path"].endswith("model.onnx")
    assert set(doc["stages"][2]) >= {"params", "file_bytes", "latency_median_ms", "latency_p90_ms", "cosine"}


def test_chart_is_a_valid_png(measured: list[StageResult], tmp_path: Path) -> None:
    import matplotlib.image

    png = stage_report.write_chart(measured, tmp_path / "stages.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image.std() > 0.01  # not a blank canvas


def test_mean_row_cosine_against_a_hand_value() -> None:
    a = np.array([[[1.0, 0.0], [1.0, 1.0]]])
    b = np.array([[[0.0, 1.0], [1.0, 1.0]]])
    assert stage_report.mean_row_cosine(a, b) == pytest.approx(0.5)  # rows: cos 0 and cos 1
    zero = np.zeros((2, 2))
    assert stage_report.mean_row_cosine(zero, zero) == 1.0
    assert stage_report.mean_row_cosine(zero, np.ones((2, 2))) == 0.0


def test_accuracy_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        stage_report.accuracy({"y": np.zeros((1, 2))}, {"y": np.zeros((1, 3))})
    assert stage_report.accuracy({"z": np.zeros(1)}, {"y": np.zeros(1)}) == (None, None)
