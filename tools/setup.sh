#!/usr/bin/env bash
# Set up a fresh machine: a venv with the CPU build of torch, the package and its dev tools.
# Usage: bash tools/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"$venv/bin/pip" install -q "torch==2.13.0"
# dev: tests and linters; bench: the peers the README's benchmarks compare with (NNCF)
"$venv/bin/pip" install -q -e ".[dev,bench]"
# The stubs declare a dependency on tensorrt itself, whose libraries cannot be fetched here.
"$venv/bin/pip" install -q --no-deps tensorrt-stubs
# ...and lack py.typed, so mypy would skip them: copy and repair them into typings/ ([tool.mypy]).
"$venv/bin/python" tools/tensorrt_stubs_for_mypy.py typings
