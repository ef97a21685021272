"""engine-bench end to end on a tiny ONNX encoder: every summary line, the exported JSON, bad flags.

No timing assertions: the printed numbers are checked against the exported per-query times
(recomputed with numpy), not against expectations about speed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from bench_models import VOCAB, write_tiny_encoder

from engines import bench_cli, bench_inputs

FAST = ["--warmUp=5", "--duration=0", "--iterations=20", "--avgRuns=5"]
NUM = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf)"


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny") / "model.onnx")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = bench_cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def perf_values(line: str, label: str, percentiles: list[str]) -> dict[str, float]:
    """Parse trtexec's `label: min = X ms, max = ..., percentile(P%) = Y ms` line; fail if the layout differs."""
    keys = ["min", "max", "mean", "median"] + [f"percentile({p}%)" for p in percentiles]
    pattern = f"{label}: " + ", ".join(re.escape(k) + f" = ({NUM}) ms" for k in keys)
    match = re.fullmatch(pattern, line)
    assert match, f"layout differs:\n{line}\n{pattern}"
    return {k: float(v) for k, v in zip(keys, match.groups())}


def test_summary_lines_and_exported_json(
    tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    times, summary = tmp_path / "times.json", tmp_path / "summary.json"
    argv = [
        str(tiny_onnx),
        "--shapes=input_ids:2x16",
        *FAST,
        "--percentile=50,90,99",
        f"--exportTimes={times}",
        f"--exportJson={summary}",
        "--threads=1",
    ]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    lines = out.splitlines()

    assert lines[0] == f"Model: {tiny_onnx} (backend onnxruntime)"
    assert lines[1] == "Shapes: input_ids:2x16,attention_mask:2x16,token_type_ids:2x16"
    lines = lines[1:]
    assert re.fullmatch(rf"Warmup completed \d+ queries over {NUM} ms", lines[1])
    assert re.fullmatch(rf"Timing trace has 20 queries over {NUM} s", lines[2])
    assert lines[4:6] == ["=== Trace details ===", "Trace averages of 5 runs:"]
    averages = [
        float(re.fullmatch(rf"Average on 5 runs - Host latency: ({NUM}) ms", x).group(1)) for x in lines[6:10]
    ]  # type: ignore[union-attr]
    start = lines.index("=== Performance summary ===")
    throughput = float(re.fullmatch(rf"Throughput: ({NUM}) qps", lines[start + 1]).group(1))  # type: ignore[union-attr]
    latency = perf_values(lines[start + 2], "Latency", ["50", "90", "99"])
    walltime = float(re.fullmatch(rf"Total Host Walltime: ({NUM}) s", lines[start + 3]).group(1))  # type: ignore[union-attr]
    assert not any(k in out for k in ("GPU Compute", "H2D", "D2H", "Enqueue Time")), "GPU lines on a CPU run"

    records = json.loads(times.read_text())
    assert len(records) == 20 and all(set(r) == {"startMs", "endMs", "latencyMs"} for r in records)
    lat = np.array([r["latencyMs"] for r in records])
    np.testing.assert_allclose(lat, [r["endMs"] - r["startMs"] for r in records], rtol=1e-9)
    ordered = np.sort(lat)
    expected = {
        "min": lat.min(),
        "max": lat.max(),
        "mean": lat.mean(),
        "median": np.median(lat),
        "percentile(50%)": ordered[9],
        "percentile(90%)": ordered[17],
        "percentile(99%)": ordered[19],
    }
    for key, value in expected.items():
        assert latency[key] == pytest.approx(value, rel=1e-5), key  # printed with 6 significant digits
    np.testing.assert_allclose(averages, lat.reshape(4, 5).mean(axis=1), rtol=1e-5)
    span_s = (records[-1]["endMs"] - records[0]["startMs"]) / 1000
    assert walltime == pytest.approx(span_s, rel=1e-5)
    assert throughput == pytest.approx(20 / span_s, rel=1e-5)

    doc = json.loads(summary.read_text())
    (variant,) = doc["variants"]
    assert variant["queries"] == 20 and variant["backend"] == "onnxruntime"
    assert variant["latencyMs"]["median"] == pytest.approx(np.median(lat), rel=1e-9)
    assert variant["latencyMs"]["percentiles"] == pytest.approx(
        {"50": ordered[9], "90": ordered[17], "99": ordered[19]}, rel=1e-9
    )
    assert variant["latencyMs"]["coefficientOfVariationPercent"] == pytest.approx(
        lat.std() / lat.mean() * 100, rel=1e-6
    )
    assert variant["throughputQps"] == pytest.approx(20 / span_s, rel=1e-9)
    assert doc["shapes"] == {"input_ids": [2, 16]}
    assert variant["inputShapes"] == {n: [2, 16] for n in ("input_ids", "attention_mask", "token_type_ids")}


def test_compare_is_interleaved_with_ratios_to_the_first(
    tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = write_tiny_encoder(tmp_path / "other.onnx", seed=1)
    times = tmp_path / "times.json"
    code, out, err = run(
        ["--compare", str(tiny_onnx), str(other), *FAST, "--quiet", f"--exportTimes={times}"], capsys
    )
    assert code == 0, err
    assert "Trace details" not in out  # --quiet
    assert out.count("=== Performance summary ===") == 2
    table = out[out.index("=== Comparison (2 variants interleaved, ratios to model.onnx) ===") :].splitlines()
    assert table[1].startswith("| variant | backend | median ms | p90 ms |")
    assert table[3].startswith("| model.onnx | onnxruntime |") and table[3].endswith("| 1.000x |")
    assert table[4].startswith("| other.onnx | onnxruntime |")
    records = json.loads(times.read_text())
    order = [r["variant"] for r in sorted(records, key=lambda r: r["startMs"])]  # one clock for both
    assert order[:4] == ["model.onnx", "other.onnx", "model.onnx", "other.onnx"]  # round-robin


def test_out_dir_benchmarks_every_stage_in_stage_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tiny_encoder(tmp_path / "model.int8.onnx", quantized_table=True)
    write_tiny_encoder(tmp_path / "model.onnx")
    write_tiny_encoder(tmp_path / "model.exported.onnx")
    write_tiny_encoder(tmp_path / "zz.extra.onnx")
    (tmp_path / "report.md").write_text("not a model")
    code, out, err = run([str(tmp_path), *FAST, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    names = [v["name"] for v in doc["variants"]]
    assert names == ["model.exported.onnx", "model.onnx", "model.int8.onnx", "zz.extra.onnx"]
    assert doc["variants"][0]["medianRatioToFirst"] == 1.0


def test_default_feeds_are_valid_tokens(tiny_onnx: Path) -> None:
    from engines.base import TensorSpec

    assert bench_inputs.vocab_size(tiny_onnx) == VOCAB
    specs = [
        TensorSpec(n, np.dtype(np.int64), ("batch", "sequence"))
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    shapes = bench_inputs.resolve_shapes(specs, {"input_ids": (8, 128)})
    assert shapes == {n: (8, 128) for n in ("input_ids", "attention_mask", "token_type_ids")}
    feeds = bench_inputs.make_feeds(specs, shapes, VOCAB)
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < VOCAB
    assert len(np.unique(feeds["input_ids"])) > 10  # random, not constant
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    assert bench_inputs.resolve_shapes(specs, {})["input_ids"] == (1, 128)


def test_vocab_falls_back_to_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 321}))
    (tmp_path / "model.plan").write_bytes(b"")
    assert bench_inputs.vocab_size(tmp_path / "model.plan") == 321


def test_load_inputs_npz(tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "feeds.npz"
    ids = np.arange(12).reshape(1, 12)
    np.savez(npz, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    code, out, err = run([str(tiny_onnx), f"--loadInputs={npz}", *FAST, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["variants"][0]["queries"] == 20


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--iterations=0"], "iterations"),
        (["--warmUp=abc"], "--warmUp"),
        (["--shapes=input_ids:8xq"], "--shapes"),
        (["--shapes=nope:1x2"], "unknown input"),
        (["--percentile=101"], "percentiles"),
        (["--percentile=9o"], "--percentile"),
        (["--backend=cuda"], "--backend"),
        (["--threads=0"], "--threads"),
        (["--loadInputs=/nonexistent.npz"], "/nonexistent.npz"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    tiny_onnx: Path, flags: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run([str(tiny_onnx), *FAST, *flags], capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("engine-bench: error: "), err
    assert names in err and "Traceback" not in err


def test_missing_model_and_no_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run([str(tmp_path / "absent.onnx")], capsys)
    assert code == 2 and "absent.onnx: no such file" in err
    code, _, err = run([], capsys)
    assert code == 2 and "give a model" in err
    code, _, err = run([str(tmp_path)], capsys)
    assert code == 2 and "no .onnx model in this folder" in err


def test_every_flag_has_help_and_reaches_the_options() -> None:
    parser = bench_cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
    args = parser.parse_args(
        [
            "m.onnx",
            "--warmUp=50",
            "--iterations=3",
            "--duration=1.5",
            "--avgRuns=2",
            "--percentile=95",
            "--shapes=input_ids:4x32",
            "--threads=2",
            "--seed=7",
        ]
    )
    options = bench_cli.options_from_args(args)
    assert options.config == bench_cli.BenchConfig(50.0, 3, 1.5, 2, (95.0,))
    assert options.shapes == {"input_ids": (4, 32)} and options.threads == 2 and options.seed == 7


def test_copied_model_keeps_its_own_name(tiny_onnx: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    copy = shutil.copy(tiny_onnx, tmp_path / "a" / "model.onnx")
    assert bench_cli._display_names([tiny_onnx, Path(copy)]) == [str(tiny_onnx), str(copy)]


def _decoder_specs() -> list:
    from engines.base import TensorSpec

    i64 = np.dtype(np.int64)
    return [
        TensorSpec("input_ids", i64, ("batch_size", "sequence_length")),
        TensorSpec("attention_mask", i64, ("batch_size", "total_sequence_length")),
        TensorSpec("position_ids", i64, ("batch_size", "sequence_length")),
        TensorSpec(
            "past_key_values.0.key", np.dtype(np.float32), ("batch_size", 4, "past_sequence_length", 8)
        ),
        TensorSpec(
            "past_key_values.1.key", np.dtype(np.float32), ("batch_size", 2, "past_sequence_length", 8)
        ),
    ]


def test_kv_cache_decoder_defaults_are_a_consistent_prefill() -> None:
    specs = _decoder_specs()
    shapes = bench_inputs.resolve_shapes(specs, {})
    assert shapes["input_ids"] == (1, 128) and shapes["attention_mask"] == (1, 128)
    assert shapes["past_key_values.0.key"] == (1, 4, 0, 8) and shapes["past_key_values.1.key"] == (1, 2, 0, 8)
    feeds = bench_inputs.make_feeds(specs, shapes, VOCAB)
    assert feeds["position_ids"].tolist() == [list(range(128))]


def test_kv_cache_decoder_decode_step_from_one_past_shape() -> None:
    """One past input sized in --shapes sizes every layer's past (its own KV heads), the mask covers past +
    new tokens and the positions continue after the past."""
    specs = _decoder_specs()
    shapes = bench_inputs.resolve_shapes(specs, {"input_ids": (2, 1), "past_key_values.0.key": (2, 4, 64, 8)})
    assert shapes["attention_mask"] == (2, 65) and shapes["past_key_values.1.key"] == (2, 2, 64, 8)
    feeds = bench_inputs.make_feeds(specs, shapes, VOCAB)
    assert feeds["position_ids"].tolist() == [[64], [64]]


def test_a_real_decoder_runs_and_a_run_time_failure_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_decoder_export import build_pruned_model

    from exporter.export.decoder_with_past import export_decoder_with_past

    path = tmp_path / "decoder_model.onnx"
    export_decoder_with_past(build_pruned_model("llama", seed=1), path)
    code, out, _ = run([str(path), *FAST, "--shapes=input_ids:1x1,past_key_values.0.key:1x4x16x8"], capsys)
    assert code == 0 and "attention_mask:1x17" in out, out
    bad = "--shapes=input_ids:1x1,attention_mask:1x3,past_key_values.0.key:1x4x16x8"  # mask shorter than the past
    code, out, err = run([str(path), *FAST, bad], capsys)
    assert code == 1 and "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("engine-bench:")]
    assert len(ours) == 1 and ours[0].startswith("engine-bench: error: "), err


OV_SKIP = __import__("engines.openvino_runner", fromlist=["x"]).openvino_unavailable_reason()


@pytest.mark.skipif(OV_SKIP is not None, reason=f"OpenVINO: {OV_SKIP}")
def test_backend_openvino_runs_an_onnx_file(tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([str(tiny_onnx), "--backend", "openvino", *FAST, "--json"], capsys)
    assert code == 0, err
    variant = json.loads(out)["variants"][0]
    assert variant["backend"] == "openvino" and variant["queries"] >= 20


def test_out_dir_adds_the_cpu_engine_candidates_and_marks_the_chosen(tmp_path: Path) -> None:
    for name in ("model.exported.onnx", "model.onnx", "model.int8.cpu.onnx", "model.int8.openvino.onnx"):
        write_tiny_encoder(tmp_path / name)
    rows = [
        {
            "name": "openvino-int8",
            "engine": "openvino",
            "file": "model.int8.openvino.onnx",
            "engine_precision": "f32",
            "chosen": True,
        },
        {"name": "onnxruntime-int8", "engine": "onnxruntime", "file": "model.int8.cpu.onnx", "chosen": False},
        {
            "name": "openvino-fp32",
            "engine": "openvino",
            "file": "model.exported.onnx",
            "engine_precision": "f32",
            "chosen": False,
        },
        {
            "name": "openvino-bf16",
            "engine": "openvino",
            "file": "model.exported.onnx",
            "error": "cannot load",
        },
    ]
    cpu = {
        "candidate": "openvino-int8",
        "engine": "openvino",
        "file": "model.int8.openvino.onnx",
        "candidates": rows,
    }
    (tmp_path / "report.json").write_text(json.dumps({"engine": {"cpu": cpu}}))
    targets = bench_cli.model_targets([tmp_path])
    names = bench_cli._display_names(targets)
    if OV_SKIP is not None:  # OpenVINO's variants are left out (and that is logged)
        assert names == ["model.exported.onnx", "model.onnx", "model.int8.cpu.onnx [onnxruntime-int8]"]
        return
    assert names == [
        "model.exported.onnx",
        "model.onnx",
        "model.int8.cpu.onnx [onnxruntime-int8]",
        "model.int8.openvino.onnx [openvino-int8] (chosen CPU engine)",
        "model.exported.onnx [openvino-fp32]",
    ]
    assert [(t.backend, t.precision) for t in targets][3:] == [("openvino", "f32"), ("openvino", "f32")]
    # asked for one runtime, an export folder is every file on it, nothing added
    assert [t.backend for t in bench_cli.model_targets([tmp_path], "onnxruntime")] == ["onnxruntime"] * 4
