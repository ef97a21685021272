"""The README's Python example runs as written (on a tiny demo_model, so it stays fast)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from exporter.testing.synthetic import layer_param, row_mask, write_model_dir

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = readme_python_blocks()
    assert blocks, "the README lost its Python example"
    masks = {layer_param("bert", 0, "up"): row_mask((128, 64), range(8))}
    write_model_dir(tmp_path / "demo_model", "bert", masks=masks, tokenizer=True)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "->" in out and "onnx" in out
    assert (tmp_path / "out" / "api-demo" / "model.onnx").exists()
    # the served export: the CPU engine the export chose by timing (ONNX Runtime's model.onnx or OpenVINO's
    # model.exported.onnx, whichever was faster on this machine), as report.json names it
    chosen = json.loads((tmp_path / "out" / "api-demo" / "report.json").read_text())["engine"]["cpu"]["file"]
    assert chosen in ("model.onnx", "model.exported.onnx")
    assert f"feature-extraction -> {chosen}" in out


def test_every_cli_flag_is_in_the_readme_usage() -> None:
    """The README's usage block lists every export-engine flag (it cannot drift from the parser)."""
    from exporter.cli import build_parser

    usage = README.read_text().split("## Usage", 1)[1].split("```", 2)[1]
    flags = [f for a in build_parser()._actions for f in a.option_strings if f.startswith("--")]
    missing = [f for f in flags if f not in ("--help", "--version") and f not in usage]
    assert not missing, f"README usage lacks {missing}"
