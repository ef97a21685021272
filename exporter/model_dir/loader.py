"""MODEL_DIR -> ModelDir -> the PyTorch reference model every export is checked against.

A MODEL_DIR is a Hugging Face model folder (config.json + safetensors, optionally sharded; tokenizer
and sentence-transformers pooling optional), pruning masks in one of three forms (see
exporter/model_dir/masks.py) and optionally a PEFT LoRA adapter in `adapter/`. The reference is
effective weight = (W + scaling·B·A) ⊙ mask: merge first (the adapter is shaped for the unpruned
dimensions), then mask.

Everything here is checked before any model is built, against a meta-device skeleton of the HF
class: each bad input raises an InputError naming the file (and tensor) and the problem. Nothing
runs code from the folder: config via AutoConfig without trust_remote_code, weights via safetensors;
pickles (.bin/.pt) only with `allow_pickle=True`, and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from export_errors import InputError
from exporter.model_dir import masks as masks_io
from exporter.model_dir.files import (
    one_line,
    read_json,
    read_weights,
)
from exporter.model_dir.lora import Adapter, LoraMerge, check_adapter, merge_lora, read_adapter
from exporter.model_dir.pooling import Pooling, read_pooling
from exporter.model_dir.tokenizer import find_tokenizer

logger = logging.getLogger(__name__)

ENCODER_MODEL_TYPES = ("bert", "roberta")
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = ENCODER_MODEL_TYPES + DECODER_MODEL_TYPES

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"  # carried into OUT_DIR as is (eos ids, sampling defaults)
ADAPTER_DIR = "adapter"
MaskSource = str  # "pruning_masks.safetensors" | "torch.nn.utils.prune" | "zeros-in-weights" | "none"


@dataclass
class ModelDir:
    """A MODEL_DIR read and checked: names normalised to the HF class we build, masks at full shape."""

    path: Path
    config: PretrainedConfig
    model_type: str
    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    mask_source: MaskSource
    adapter_path: Path | None
    tokenizer_path: Path | None
    pooling: Pooling | None
    adapter: Adapter | None = None
    generation_config_path: Path | None = (
        None  # MODEL_DIR/generation_config.json, checked to be a JSON object
    )
    ignored_tensors: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    lora_merge: LoraMerge | None = None  # filled by build_reference_model

    @property
    def is_decoder(self) -> bool:
        return self.model_type in DECODER_MODEL_TYPES


# ---------------------------------------------------------------------------------------- the loader


def load_model_dir(path: str | Path, adapter: Path | None = None, allow_pickle: bool = False) -> ModelDir:
    """Read and check a MODEL_DIR; every bad input raises an InputError naming the file and problem."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "MODEL_DIR not found (expected a folder with config.json and weights)")
    config = read_config(path)
    skeleton = build_skeleton(config, path / CONFIG_FILE)
    params = NameMap(dict(skeleton.state_dict()).keys(), str(skeleton.base_model_prefix))
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    raw, weights_where = read_weights(path, allow_pickle)
    raw, prune_masks = masks_io.split_prune_pairs(raw, weights_where)
    weights, ignored = normalise_weights(raw, params, shapes, skeleton, weights_where)
    masks, source = read_masks(path, weights, prune_masks, params, shapes, skeleton, weights_where)
    adapter_path = find_adapter(path, adapter)
    lora = None
    if adapter_path is not None:
        modules = NameMap([n for n, _ in skeleton.named_modules() if n], str(skeleton.base_model_prefix))
        lora = check_adapter(read_adapter(adapter_path, allow_pickle), skeleton, modules)
    return ModelDir(
        path=path,
        config=config,
        model_type=config.model_type,
        weights=weights,
        masks=masks,
        mask_source=source,
        adapter_path=adapter_path,
        tokenizer_path=find_tokenizer(path),
        pooling=read_pooling(path),
        adapter=lora,
        generation_config_path=find_generation_config(path),
        ignored_tensors=ignored,
    )


def read_config(path: Path) -> PretrainedConfig:
    """config.json via AutoConfig (never trust_remote_code), with a supported model_type."""
    from transformers import AutoConfig

    file = path / CONFIG_FILE
    if not file.exists():
        raise InputError(file, "missing: a MODEL_DIR needs the Hugging Face config.json")
    raw = read_json(file)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            file, f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # config classes validate with many exception types
        raise InputError(file, f"not a valid {model_type} config: {one_line(exc)}") from exc
    config._attn_implementation = "eager"
    return config


def build_skeleton(config: PretrainedConfig, where: Path) -> nn.Module:
    """A meta-device model (shapes, names, module types; no memory) to check every input against."""
    try:
        return new_model(config, device="meta")
    except Exception as exc:  # inconsistent configs fail deep inside model code
        raise InputError(where, f"cannot build a {config.model_type} model from it: {one_line(exc)}") from exc


def new_model(config: PretrainedConfig, device: str | None = None, initialize: bool = True) -> nn.Module:
    """The HF class we build: AutoModel without pooler for encoders, AutoModelForCausalLM for decoders,
    eager attention, fp32. `device="meta"` gives a shape-only skeleton; `initialize=False` skips the
    random init of weights that are about to be overwritten (seconds on large models)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device(device or "cpu"), contextlib.nullcontext() if initialize else no_init_weights():
        if config.model_type in DECODER_MODEL_TYPES:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        else:
            model = AutoModel.from_config(
                config, add_pooling_layer=False, attn_implementation="eager", dtype=torch.float32
            )
    if not initialize and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


# ----------------------------------------------------------------------------------------------- weights


class NameMap:
    """Maps checkpoint names onto the names of the model we build, accepting the checkpoint's own
    prefix (e.g. "bert." from BertForSequenceClassification, or a missing "model." of LlamaModel)."""

    def __init__(self, names: Iterable[str], prefix: str) -> None:
        self.names = frozenset(names)
        self.prefix = prefix + "." if prefix else ""

    def __call__(self, name: str) -> str | None:
        candidates = (name, name.removeprefix(self.prefix), self.prefix + name) if self.prefix else (name,)
        return next((c for c in candidates if c in self.names), None)


def normalise_weights(
    raw: Mapping[str, torch.Tensor],
    params: NameMap,
    shapes: Mapping[str, torch.Size],
    skeleton: nn.Module,
    where: Path,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename to the model's names, check shapes and completeness; returns (weights, ignored names)."""
    weights: dict[str, torch.Tensor] = {}
    ignored = []
    for raw_name, tensor in raw.items():
        name = params(raw_name)
        if name is None:
            ignored.append(raw_name)
            continue
        if tensor.shape != shapes[name]:
            raise InputError(
                where,
                f"tensor {raw_name!r} has shape {list(tensor.shape)}; config.json implies {list(shapes[name])}",
            )
        weights[name] = tensor
    missing = sorted(set(shapes) - set(weights) - tied_names(skeleton))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(where, f"tensor {missing[0]!r} is missing{more}")
    if ignored:
        logger.info(
            "ignoring %d checkpoint tensors the model has no place for: %s", len(ignored), ignored[:5]
        )
    return weights, ignored


def tied_names(model: nn.Module) -> set[str]:
    """Parameters tied to another (e.g. lm_head.weight = embed_tokens when tie_word_embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied)


# --------------------------------------------------------------------------------------------------- masks


def read_masks(
    path: Path,
    weights: Mapping[str, torch.Tensor],
    prune_masks: Mapping[str, torch.Tensor],
    params: NameMap,
    shapes: Mapping[str, torch.Size],
    skeleton: nn.Module,
    weights_where: Path,
) -> tuple[dict[str, torch.Tensor], MaskSource]:
    """The masks of whichever form the folder uses, validated and at full shape, and the form's name."""
    sources, masks = [], {}
    if prune_masks:
        for raw_name, mask in prune_masks.items():
            name = params(raw_name)
            if name is None:
                raise InputError(
                    weights_where, f"prune mask {raw_name + '_mask'!r} names no parameter of the model"
                )
            masks[name] = masks_io.validate_mask(mask, raw_name + "_mask", shapes[name], weights_where)
        sources.append("torch.nn.utils.prune")
    if (path / masks_io.MASKS_FILE).exists():
        from_file = masks_io.read_mask_file(path / masks_io.MASKS_FILE, shapes, params)
        masks = masks_io.combine(from_file, masks)
        sources.insert(0, masks_io.MASKS_FILE)
    if sources:
        return masks, "+".join(sources)
    zeros = masks_io.masks_from_zeros(weights, linear_weight_names(skeleton))
    return zeros, "zeros-in-weights" if zeros else "none"


def linear_weight_names(model: nn.Module) -> list[str]:
    """Weights of the Linear layers of the body (not lm_head, often tied to the embeddings)."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


# ------------------------------------------------------------------------------------ adapter and extras


def find_adapter(path: Path, adapter: Path | None) -> Path | None:
    """The --adapter folder if given (must exist), else MODEL_DIR/adapter/ if present, else None."""
    if adapter is not None:
        adapter = Path(adapter)
        if not adapter.is_dir():
            raise InputError(adapter, "adapter folder not found (--adapter)")
        return adapter
    default = path / ADAPTER_DIR
    return default if default.is_dir() else None


def find_generation_config(path: Path) -> Path | None:
    """MODEL_DIR/generation_config.json if present (a JSON object, else an InputError), else None."""
    file = path / GENERATION_CONFIG_FILE
    if not file.exists():
        return None
    read_json(file)
    return file


# ---------------------------------------------------------------------------------------- the reference


@torch.no_grad()
def build_reference_model(md: ModelDir) -> nn.Module:
    """The masked+merged reference: HF model in fp32, eval, eager attention, base weights loaded,
    LoRA merged by PEFT, then the masks multiplied in. Records the merge in `md.lora_merge`."""
    model = new_model(md.config, initialize=False)
    result = model.load_state_dict(md.weights, strict=False)
    missing = set(result.missing_keys) - tied_names(model)
    if missing:
        raise InputError(md.path, f"tensor {sorted(missing)[0]!r} is missing")
    model = model.float().eval()
    if md.adapter is not None:
        model, md.lora_merge = merge_lora(model, md.adapter)
    masks_io.apply_masks_(model, md.masks)
    return model.eval()
