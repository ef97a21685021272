#!/usr/bin/env bash
# The test command (README): sets up .venv on a fresh machine, then runs the suite.
# GPU tests skip here with their reason. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash tools/setup.sh .venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -rs "$@"
