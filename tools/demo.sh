#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set up, build the demo MODEL_DIR
# (all-MiniLM-L6-v2 + masks + LoRA), export it. Usage: bash tools/demo.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/demo}"
[ -x .venv/bin/export-engine ] || bash tools/setup.sh .venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf demo_model && .venv/bin/python tools/make_demo_model.py demo_model
.venv/bin/export-engine demo_model -o "$out" --force
echo "full report: $out/report.md (and report.json, stages.png; every detail in $out/export.log)"
