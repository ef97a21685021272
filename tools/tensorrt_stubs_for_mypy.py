"""Make the installed tensorrt-stubs usable by mypy: copy them to a stub directory and fix them.

Why: tensorrt-stubs installs `tensorrt/` and `tensorrt_bindings/` as plain folders of `.pyi`
files without `py.typed`, so mypy skips them ("missing library stubs or py.typed marker") and,
with `ignore_missing_imports`, silently types all of TensorRT as Any: `mypy engines/` then
checks nothing against TensorRT's API. Pointed at through `mypy_path`, the stubs are read, but
pybind11-stubgen left a few lines that do not parse (parameters named `in`, a required
parameter after defaulted ones) and a module-level `bool: DataType` (TensorRT's `trt.bool`)
that shadows the builtin, turning every `-> bool` of the API into an invalid type. This script
copies the stubs and repairs exactly those lines; [tool.mypy] ignores the stubs' other errors.

Usage: python tools/tensorrt_stubs_for_mypy.py [OUT_DIR]   (default: typings, see [tool.mypy])
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")


def _stub_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package}: not installed; run: pip install --no-deps tensorrt-stubs")
    for location in spec.submodule_search_locations:
        if (Path(location) / "__init__.pyi").is_file():
            return Path(location)
    raise SystemExit(f"{package}: no __init__.pyi found (is tensorrt-stubs installed?)")


def repair(text: str) -> str:
    """Rename parameters called `in` (a keyword), drop defaults before a required parameter,
    and remove the `bool` DataType alias that shadows the builtin type."""
    text = re.sub(r"^bool: .*DataType.*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", text)
    text = text.replace(
        "shift: Weights = None, scale: Weights = None, power: Weights = None, channel_axis: int)",
        "shift: Weights | None, scale: Weights | None, power: Weights | None, channel_axis: int)",
    )
    return text


def main(out_dir: str = "typings") -> None:
    out = Path(out_dir)
    for package in PACKAGES:
        target = out / package
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(_stub_dir(package), target, ignore=shutil.ignore_patterns("__pycache__"))
        for stub in target.rglob("*.pyi"):
            stub.write_text(repair(stub.read_text()))
    print(f"TensorRT stubs for mypy written to {out}/")


if __name__ == "__main__":
    main(*sys.argv[1:2])
