"""Bad flags and bad weights are one line naming the flag, or the file and tensor, exit 2 (issue #18)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.api import export_engine
from exporter.cli import build_parser, main
from exporter.config import RANGES, ExportConfig
from exporter.testing.synthetic import LoraSpec, layer_param


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--sequence-length", "0", "must be >= 2, got 0"),
        ("--sequence-length", "1", "must be >= 2, got 1"),
        ("--batch-size", "-1", "must be >= 1, got -1"),
        ("--batch-size", "0", "must be >= 1, got 0"),
        ("--calibration-samples", "0", "must be >= 1"),
        ("--calibration-decode-steps", "-2", "must be >= 0"),
        ("--accuracy-target", "1.5", "between 0 and 1"),
        ("--accuracy-target", "nan", "finite"),
        ("--agreement-target", "-0.1", "between 0 and 1"),
        ("--int4-accuracy-target", "2", "between 0 and 1"),
        ("--int4-block-size", "24", "power of two"),
        ("--int4-block-size", "8", "16"),
        ("--threads", "0", "must be >= 1"),
        ("--seed", "-3", "between 0 and"),
        ("--batch-size", "two", "invalid int value: 'two'"),
    ],
)
def test_numeric_flags_are_range_checked_at_parse_time(flag, value, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"argument {flag}" in err and message in err, err
    assert "None" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_numeric_flag_has_a_range() -> None:
    """A new numeric flag without a range would take -1 silently: each int/float flag names its range."""
    numeric = [
        a
        for a in build_parser()._actions
        if a.option_strings and getattr(a.type, "__name__", "") in ("int", "float")
    ]
    flags = {flag for _, (flag, _) in RANGES.items()}
    assert numeric and {a.option_strings[-1] for a in numeric} <= flags
    for action in numeric:  # every one checks: its type is ours, not the bare builtin
        assert action.type not in (int, float), action.option_strings


def test_api_checks_the_same_ranges(tmp_path) -> None:
    from export_errors import InputError

    with pytest.raises(InputError, match=r"--batch-size: must be >= 1, got -1"):
        export_engine(tmp_path, tmp_path / "out", ExportConfig(batch_size=-1))
    assert not (tmp_path / "out").exists()


def _poison(file, name: str, value: float) -> None:
    tensors = load_file(str(file))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_names_file_and_tensor(model_dir_factory, tmp_path, capsys, value) -> None:
    model_dir = model_dir_factory("bert")
    name = layer_param("bert", 1, "up")
    _poison(model_dir / "model.safetensors", name, value)
    code = main([str(model_dir), "-o", str(tmp_path / "out"), "--precision", "fp32", "--no-benchmark"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "model.safetensors" in err and repr(name) in err and "non-finite" in err, err
    assert "last_hidden_state" not in err and "None" not in err


def test_non_finite_lora_factor_names_the_adapter_tensor(model_dir_factory, tmp_path, capsys) -> None:
    model_dir = model_dir_factory("bert", lora=LoraSpec(target_modules=("query", "value"), r=4, lora_alpha=8))
    file = model_dir / "adapter" / "adapter_model.safetensors"
    name = next(k for k in load_file(str(file)) if "lora_B" in k)
    _poison(file, name, float("nan"))
    code = main([str(model_dir), "-o", str(tmp_path / "out"), "--precision", "fp32", "--no-benchmark"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "adapter_model.safetensors" in err and repr(name) in err and "non-finite" in err, err


def test_text_calibration_without_tokenizer_never_says_none(model_dir_factory, tmp_path, capsys) -> None:
    model_dir = model_dir_factory("bert")  # no tokenizer files
    code = main([str(model_dir), "-o", str(tmp_path / "out"), "--no-benchmark", "--sequence-length", "16"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("export-engine:")]  # after stage lines
    assert code == 2 and len(errors) == 1, err
    assert "None" not in err and "no tokenizer files" in err, err


def test_torch_isfinite_covers_half_precision() -> None:
    """bf16/fp16 checkpoints are checked in their stored dtype (no fp32 copy)."""
    from export_errors import InputError
    from exporter.model_dir.files import check_finite

    with pytest.raises(InputError, match="1 non-finite"):
        check_finite({"w": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)}, Path("w.safetensors"))
