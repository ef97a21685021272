#!/usr/bin/env bash
# The task demo: fine-tune all-MiniLM-L6-v2 with LoRA into a 5-topic classifier (a minute or two on a CPU),
# mask it, export it with its held-out labeled sentences: the stage table shows accuracy at every stage.
# Usage: bash tools/demo_classifier.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/topic}"
[ -x .venv/bin/export-engine ] || bash tools/setup.sh .venv
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf topic_model && .venv/bin/python tools/make_topic_demo.py topic_model
.venv/bin/export-engine topic_model -o "$out" --eval-data topic_model/eval.jsonl \
  --calibration topic_model/calibration.txt --force
cat "$out/report.md"
.venv/bin/export-engine run "$out" "Set a breakpoint at this line and continue execution."
