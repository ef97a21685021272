"""The CLI maps flags onto ExportConfig and nothing else; errors are one line with the right exit code."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import build_parser, config_from_args, main
from exporter.config import ExportConfig
from exporter.testing.synthetic import layer_param, row_mask


def test_every_flag_has_help() -> None:
    for action in build_parser()._actions:
        assert action.help, f"flag {action.option_strings or action.dest} has no help"


def test_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        ["m", "-o", "o", "--precision", "fp32", "--backend", "onnxruntime", "--calibration", "random",
         "--calibration-samples", "7", "--accuracy-target", "0.95", "--strict-fusion", "--sparsity", "off",
         "--no-benchmark", "--threads", "3", "--allow-pickle", "--seed", "5", "--sequence-length", "64",
         "--task", "text-generation", "--calibration-method", "mse", "--batch-size", "4",
         "--calibration-decode-steps", "3", "--cpu-int8-weights", "reduced", "--int4-method", "rtn",
         "--int4-block-size", "64", "--int4-lm-head", "int8", "--int4-accuracy-target", "0.97", "--int4-prefill", "off"]
    )  # fmt: skip
    config = config_from_args(args)
    expected = ExportConfig(
        precision="fp32", backend="onnxruntime", calibration="random", calibration_samples=7,
        accuracy_target=0.95, strict_fusion=True, sparsity="off", benchmark=False, benchmark_threads=3,
        allow_pickle=True, seed=5, sequence_length=64, task="text-generation", calibration_method="mse",
        batch_size=4, calibration_decode_steps=3, cpu_int8_weights="reduced", int4_method="rtn",
        int4_block_size=64, int4_lm_head="int8", int4_accuracy_target=0.97, int4_prefill="off",
    )  # fmt: skip
    assert config == expected
    defaults = config_from_args(build_parser().parse_args(["m", "-o", "o"]))
    assert dataclasses.replace(defaults) == ExportConfig()


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--precision", "int2"], "invalid choice"),
        (["--calibration-samples", "many"], "invalid int value"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "-o", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_config_is_one_line_exit_2(tmp_path, capsys) -> None:
    code, _, err = run_main(capsys, str(tmp_path), "-o", str(tmp_path / "out"))
    assert code == 2
    assert "config.json" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_force(model_dir_factory, tmp_path, capsys) -> None:
    model_dir = model_dir_factory("bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_main(capsys, str(model_dir), "-o", str(out), "--precision", "fp32", "--no-benchmark")
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").exists()


def test_unsupported_family_lists_the_supported(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_main(capsys, str(tmp_path), "-o", str(tmp_path / "out"))
    assert code == 2 and "gpt2" in err and "bert" in err and "llama" in err


def test_console_script_exports_and_replaces_with_force(model_dir_factory, tmp_path) -> None:
    masks = {layer_param("bert", 0, "up"): row_mask((128, 64), range(5))}
    model_dir = model_dir_factory("bert", masks=masks)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "exporter.cli", str(model_dir), "-o", str(out), "--force",
               "--precision", "fp32", "--no-benchmark", "--sequence-length", "16", "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "model.onnx").exists() and not (out / "stale.txt").exists()


def test_backend_tensorrt_without_gpu_fails_cleanly(model_dir_factory, tmp_path, capsys) -> None:
    from engines.selection import tensorrt_skip_reason

    if tensorrt_skip_reason() is None:
        pytest.skip("TensorRT can run here: this test is for machines without it")
    code, _, err = run_main(
        capsys, str(model_dir_factory("bert")), "-o", str(tmp_path / "out"), "--backend", "tensorrt"
    )
    assert code == 2 and "--backend tensorrt" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*out*"))


def test_quiet_int8_export_prints_nothing(model_dir_factory, tmp_path) -> None:
    """--quiet: only errors. An INT8 export calls ONNX Runtime's quantizer dozens of times, which logs
    pre-processing advice on every call; none of it reaches the user."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "exporter.cli", str(model_dir_factory("bert")), "-o", str(tmp_path / "out"),
               "--calibration", "random", "--calibration-samples", "16", "--no-benchmark",
               "--sequence-length", "16", "--quiet"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == "", (done.stdout, done.stderr)
    assert (tmp_path / "out" / "model.int8.cpu.onnx").exists()


def test_cpu_engine_and_openvino_flags(capsys) -> None:
    args = build_parser().parse_args(
        ["m", "-o", "o", "--backend", "openvino", "--cpu-engine", "openvino-int8"]
    )
    config = config_from_args(args)
    assert (config.backend, config.cpu_engine) == ("openvino", "openvino-int8")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["m", "-o", "o", "--cpu-engine", "tvm"])
    assert exit_info.value.code == 2 and "invalid choice: 'tvm'" in capsys.readouterr().err


def _console_run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "exporter.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_default_console_is_short_and_the_detail_is_in_export_log(model_dir_factory, tmp_path) -> None:
    """The console contract (issue #18): a default INT8 run with the stage table prints a line per stage
    and a summary, no library chatter and no stack; export.log holds our per-pass detail and the libraries'."""
    model_dir = model_dir_factory("bert", tokenizer=True)
    out = tmp_path / "out"
    done = _console_run(str(model_dir), "-o", str(out), "--sequence-length", "16")
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    lines = console.strip().splitlines()
    assert len(lines) <= 30, console
    assert "Traceback" not in console and "Stack" not in console
    for stage in ("load", "export", "graph_passes", "int8", "stage_table"):
        assert any(line.split()[:1] == [stage] for line in lines), (stage, console)
    assert f"next: engine-bench {out}" in console and "exporter.load" in console
    assert "fold-constants" not in console  # our per-pass detail: the log's (or -v's)
    log = (out / "export.log").read_text()
    assert "graph_passes.pipeline: fold-constants" in log  # every pass's counts
    assert "onnxruntime" in log or "onnx_ir" in log  # libraries' messages land here, not on the console


def test_verbose_shows_our_detail_quiet_nothing_json_the_report(model_dir_factory, tmp_path) -> None:
    model_dir = model_dir_factory("bert")
    common = ["--precision", "fp32", "--no-benchmark", "--sequence-length", "16"]
    verbose = _console_run(str(model_dir), "-o", str(tmp_path / "v"), "-v", *common)
    assert verbose.returncode == 0, verbose.stderr
    assert "fold-constants" in verbose.stderr and "Traceback" not in verbose.stderr
    quiet = _console_run(str(model_dir), "-o", str(tmp_path / "q"), "--quiet", *common)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    as_json = _console_run(str(model_dir), "-o", str(tmp_path / "j"), "--json", *common)
    assert as_json.returncode == 0 and as_json.stderr == "", as_json.stderr
    assert json.loads(as_json.stdout)["timings_s"]["export"] > 0


def test_failed_export_is_one_line_naming_its_log(model_dir_factory, tmp_path) -> None:
    """No traceback on the console without --debug; the log of the failed run (kept out of OUT_DIR) has it."""
    model_dir = model_dir_factory("bert")
    argv = [str(model_dir), "-o", str(tmp_path / "out"), "--calibration", "random", "--calibration-samples", "8",
            "--no-benchmark", "--sequence-length", "16", "--accuracy-target", "1"]  # fmt: skip
    done = _console_run(*argv)
    assert done.returncode == 1, done.stderr
    error = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "INT8 accuracy gate failed" in error[0], done.stderr
    assert "Traceback" not in done.stderr and "Stack" not in done.stderr
    log = error[0].rsplit("(log: ", 1)[1].rstrip(")")
    assert "Traceback" in Path(log).read_text()
    assert not (tmp_path / "out").exists()
    debug = _console_run(*argv, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_kv_cache_decoder_console_has_no_stack_dump(model_dir_factory, tmp_path) -> None:
    """onnx-ir logs "Failed to get schema" with its stack for every contrib op of a decoder (91 on a 3-layer
    Llama): they belong in export.log, not on the console."""
    model_dir = model_dir_factory("llama", tokenizer="llama3", config_overrides={"num_hidden_layers": 3})
    out = tmp_path / "out"
    done = _console_run(str(model_dir), "-o", str(out), "--precision", "fp32", "--sequence-length", "16")
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert len(console.strip().splitlines()) <= 30, console
    assert "Traceback" not in console and "Stack" not in console
    assert (out / "export.log").exists()
