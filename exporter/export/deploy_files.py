"""The files a deployment needs beside the ONNX: OUT_DIR is a folder transformers and Optimum can open.

- `config.json`: the model's config with `architectures` = the task's transformers class (e.g.
  `BertForSequenceClassification`), its `id2label`/`label2id`, and `compact_layers` (per layer: heads, KV
  heads, FFN width after the restructure; a plain HF config cannot describe non-uniform layers). A decoder
  whose layers all kept the same widths gets them as its `num_attention_heads` / `num_key_value_heads` /
  `intermediate_size` (with an explicit `head_dim`), so tools that size the KV cache from config.json
  (Optimum's ORTModelForCausalLM) size it right; transformers 4's `pruned_heads` is dropped (the layers are
  described by `compact_layers` now).
- the tokenizer, saved by transformers from MODEL_DIR's (so `AutoTokenizer.from_pretrained(OUT_DIR)` works);
- decoders: `generation_config.json` (MODEL_DIR's is carried by the API as is; without one, derived from
  the config);
- sentence-transformers models: `modules.json`, `sentence_bert_config.json` and the Pooling folder.
The ONNX keeps Optimum's file name (`model.onnx`) and input/output names; ORTModelFor...(OUT_DIR) loads it.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from exporter.model_dir.loader import ModelDir
from exporter.restructure.plan import RestructurePlan

SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def deployment_config(md: ModelDir, plan: RestructurePlan) -> Any:
    """The config.json of the exported model (see the module docstring)."""
    config = copy.deepcopy(md.config)
    config.architectures = [md.architecture]
    if hasattr(config, "pruned_heads"):
        del config.pruned_heads
    layers = [
        {"heads": layer.shapes.heads, "kv_heads": layer.shapes.kv_heads, "ffn": layer.shapes.ffn}
        for layer in plan.layers
    ]
    config.compact_layers = layers
    if md.task.kind == "decoder" and len({(x["heads"], x["kv_heads"], x["ffn"]) for x in layers}) == 1:
        config.head_dim = plan.head_dim
        config.num_attention_heads = layers[0]["heads"]
        config.num_key_value_heads = layers[0]["kv_heads"]
        config.intermediate_size = layers[0]["ffn"]
    return config


def write_deployment_files(out: Path, md: ModelDir, plan: RestructurePlan) -> dict[str, Any]:
    """Write config.json, the tokenizer, generation_config.json and the pooling files into `out`."""
    written = ["config.json"]
    deployment_config(md, plan).save_pretrained(str(out))
    if md.tokenizer_path is not None:
        from transformers import AutoTokenizer

        before = {p.name for p in out.iterdir()}
        AutoTokenizer.from_pretrained(str(md.tokenizer_path)).save_pretrained(str(out))
        written += sorted({p.name for p in out.iterdir()} - before)
    if md.task.kind == "decoder" and not (out / "generation_config.json").exists():
        written.append(_generation_config(md, out))
    if md.task.needs_pooling:
        for name in SENTENCE_TRANSFORMERS_FILES:
            if (md.path / name).is_file():
                shutil.copy2(md.path / name, out / name)
                written.append(name)
        for folder in sorted(md.path.glob("*_Pooling")):
            shutil.copytree(folder, out / folder.name, dirs_exist_ok=True)
            written.append(folder.name + "/")
    return {
        "files": written,
        "architecture": md.architecture,
        "optimum_class": md.task.optimum_class,
        "pipeline": md.task.pipeline,
        "model_file": "model.onnx",
    }


def _generation_config(md: ModelDir, out: Path) -> str:
    """A decoder folder without generation_config.json gets the one transformers derives from its config."""
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(md.config).save_pretrained(str(out))
    return "generation_config.json"
