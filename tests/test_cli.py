"""The CLI maps flags onto ExportConfig and nothing else; errors are one line with the right exit code."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

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
         "--int4-block-size", "64", "--int4-lm-head", "int8", "--int4-accuracy-target", "0.97"]
    )  # fmt: skip
    config = config_from_args(args)
    expected = ExportConfig(
        precision="fp32", backend="onnxruntime", calibration="random", calibration_samples=7,
        accuracy_target=0.95, strict_fusion=True, sparsity="off", benchmark=False, benchmark_threads=3,
        allow_pickle=True, seed=5, sequence_length=64, task="text-generation", calibration_method="mse",
        batch_size=4, calibration_decode_steps=3, cpu_int8_weights="reduced", int4_method="rtn",
        int4_block_size=64, int4_lm_head="int8", int4_accuracy_target=0.97,
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
