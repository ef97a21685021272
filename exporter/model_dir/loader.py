"""MODEL_DIR -> ModelDir -> the PyTorch reference model every export is checked against.

A MODEL_DIR is a Hugging Face model folder (config.json + safetensors, optionally sharded; tokenizer
and sentence-transformers pooling optional), pruning masks in one of three forms (see
exporter/model_dir/masks.py) and optionally a PEFT LoRA adapter in `adapter/`. The reference is
effective weight = (W + scaling·B·A) ⊙ mask: merge first (the adapter is shaped for the unpruned
dimensions), then mask.

The HF class is the task's (exporter/tasks: `BertForSequenceClassification` for a classifier, ...), so
the checkpoint's head, or the one the adapter saved through `modules_to_save`, is part of the reference; a
transformers 4 `pruned_heads` checkpoint is built at its saved widths (exporter/model_dir/pruned_heads.py).

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
from exporter.model_dir.lazy_weights import read_lazy_weights
from exporter.model_dir.lora import Adapter, LoraMerge, check_adapter, merge_lora, read_adapter
from exporter.model_dir.pooling import Pooling, read_pooling
from exporter.model_dir.pruned_heads import apply_pruned_heads, read_pruned_heads
from exporter.model_dir.tokenizer import find_tokenizer
from exporter.tasks.registry import (
    DECODER_TYPES,
    ENCODER_TYPES,
    ChosenTask,
    architecture_for,
    check_task_config,
    choose_task,
)
from exporter.tasks.spec import Task

logger = logging.getLogger(__name__)

ENCODER_MODEL_TYPES = ENCODER_TYPES
DECODER_MODEL_TYPES = DECODER_TYPES
SUPPORTED_MODEL_TYPES = ENCODER_MODEL_TYPES + DECODER_MODEL_TYPES

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"  # carried into OUT_DIR as is (eos ids, sampling defaults)
ADAPTER_DIR = "adapter"
MaskSource = str  # "pruning_masks.safetensors" | "torch.nn.utils.prune" | "zeros-in-weights" | "none"
ZEROS_PER_LAYER = "zeros-in-weights (looked for per layer while streaming)"


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
    task: Task
    task_source: str = "default"
    adapter: Adapter | None = None
    generation_config_path: Path | None = (
        None  # MODEL_DIR/generation_config.json, checked to be a JSON object
    )
    ignored_tensors: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    pruned_heads: dict[int, list[int]] = field(default_factory=dict)  # transformers 4 prune_heads, per layer
    lora_merge: LoraMerge | None = None  # filled by build_reference_model

    @property
    def is_decoder(self) -> bool:
        return self.model_type in DECODER_MODEL_TYPES

    @property
    def architecture(self) -> str:
        """The transformers class the task's model is built as (e.g. BertForSequenceClassification)."""
        return architecture_for(self.task, self.model_type)


# ---------------------------------------------------------------------------------------- the loader


def load_model_dir(
    path: str | Path,
    adapter: Path | None = None,
    allow_pickle: bool = False,
    task: str | None = None,
    lazy: bool = False,
) -> ModelDir:
    """Read and check a MODEL_DIR; every bad input raises an InputError naming the file and problem.
    `task` overrides the task the folder asks for (exporter/tasks/registry.py). `lazy`: the weights are
    `LazyTensor`s read one at a time later (the streaming export); masks stored as zeros in the weights
    are then found per layer as it is read (`masks` holds only the file / prune-pair forms)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "MODEL_DIR not found (expected a folder with config.json and weights)")
    config = read_config(path)
    adapter_path = find_adapter(path, adapter)
    raw_adapter = read_adapter(adapter_path, allow_pickle) if adapter_path is not None else None
    pooling = read_pooling(path)
    chosen = _choose_task(path, config, task, raw_adapter, pooling)
    check_task_config(
        chosen.task,
        getattr(config, "pad_token_id", None),
        architecture_for(chosen.task, config.model_type),
        path / CONFIG_FILE,
    )
    skeleton = build_skeleton(config, path / CONFIG_FILE, chosen.task)
    params = NameMap(dict(skeleton.state_dict()).keys(), str(skeleton.base_model_prefix))
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    lora = None
    if raw_adapter is not None:
        modules = NameMap([n for n, _ in skeleton.named_modules() if n], str(skeleton.base_model_prefix))
        lora = check_adapter(raw_adapter, skeleton, modules, params, chosen.task.name)
    raw, weights_where = read_lazy_weights(path) if lazy else read_weights(path, allow_pickle)
    raw, prune_masks = masks_io.split_prune_pairs(raw, weights_where)
    if lazy:
        prune_masks = {name: mask.load() for name, mask in prune_masks.items()}
    provided = set(lora.head_tensors) if lora is not None else set()
    weights, ignored = normalise_weights(raw, params, shapes, skeleton, weights_where, provided, chosen.task)
    masks, source = read_masks(path, weights, prune_masks, params, shapes, skeleton, weights_where, lazy)
    return ModelDir(
        path=path,
        config=config,
        model_type=config.model_type,
        weights=weights,
        masks=masks,
        mask_source=source,
        adapter_path=adapter_path,
        tokenizer_path=find_tokenizer(path),
        pooling=pooling,
        task=chosen.task,
        task_source=chosen.source,
        adapter=lora,
        generation_config_path=find_generation_config(path),
        ignored_tensors=ignored,
        pruned_heads=read_pruned_heads(config, path / CONFIG_FILE),
    )


def _choose_task(
    path: Path, config: PretrainedConfig, task: str | None, adapter: Adapter | None, pooling: Pooling | None
) -> ChosenTask:
    task_type = getattr(adapter.config, "task_type", None) if adapter is not None else None
    return choose_task(
        config.model_type,
        list(getattr(config, "architectures", None) or []),
        override=task,
        adapter_task_type=str(task_type.value if hasattr(task_type, "value") else task_type)
        if task_type
        else None,
        has_pooling=pooling is not None,
        config_file=path / CONFIG_FILE,
        adapter_config=adapter.path / "adapter_config.json" if adapter is not None else None,
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
    read_pruned_heads(config, file)  # a malformed pruned_heads is refused here, naming config.json
    return config


def build_skeleton(config: PretrainedConfig, where: Path, task: Task | None = None) -> nn.Module:
    """A meta-device model (shapes, names, module types; no memory) to check every input against."""
    try:
        return new_model(config, device="meta", task=task)
    except InputError:
        raise
    except Exception as exc:  # inconsistent configs fail deep inside model code
        raise InputError(where, f"cannot build a {config.model_type} model from it: {one_line(exc)}") from exc


def new_model(
    config: PretrainedConfig, device: str | None = None, initialize: bool = True, task: Task | None = None
) -> nn.Module:
    """The HF class of the task (default: AutoModel without pooler for encoders, AutoModelForCausalLM for
    decoders), eager attention, fp32, the layers a transformers 4 `pruned_heads` checkpoint saved smaller
    allocated at their saved width. `device="meta"` gives a shape-only skeleton; `initialize=False` skips
    the random init of weights that are about to be overwritten (seconds on large models)."""
    import transformers
    from transformers.initialization import no_init_weights

    decoder = config.model_type in DECODER_MODEL_TYPES
    mapping = task.auto_mapping if task is not None else ("" if decoder else "MODEL_MAPPING_NAMES")
    kwargs = {"add_pooling_layer": False} if mapping == "MODEL_MAPPING_NAMES" else {}
    auto_class = transformers.AutoModelForCausalLM
    if task is not None or not decoder:
        auto_class = getattr(transformers, AUTO_CLASSES[mapping])
    with torch.device(device or "cpu"), contextlib.nullcontext() if initialize else no_init_weights():
        model = auto_class.from_config(config, attn_implementation="eager", dtype=torch.float32, **kwargs)
    apply_pruned_heads(model, read_pruned_heads(config, CONFIG_FILE))
    if not initialize and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


# transformers' auto-model mapping name -> the Auto class that builds from it
AUTO_CLASSES = {
    "MODEL_MAPPING_NAMES": "AutoModel",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "AutoModelForMaskedLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForSequenceClassification",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "AutoModelForTokenClassification",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": "AutoModelForQuestionAnswering",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "AutoModelForCausalLM",
}


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
    provided: set[str] | frozenset[str] = frozenset(),
    task: Task | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename to the model's names, check shapes and completeness; returns (weights, ignored names).
    `provided`: parameters the adapter carries whole (PEFT modules_to_save), so the checkpoint may lack them."""
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
    missing = sorted(set(shapes) - set(weights) - tied_names(skeleton) - set(provided))
    heads = [name for name in missing if not _in_backbone(name, skeleton)]
    if heads and task is not None:
        raise InputError(
            where,
            f"{task.name} needs head tensors {heads}, in neither the checkpoint nor the adapter "
            "(modules_to_save); pass --task for another task",
        )
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(where, f"tensor {missing[0]!r} is missing{more}")
    if ignored:
        logger.info(
            "ignoring %d checkpoint tensors the model has no place for: %s", len(ignored), ignored[:5]
        )
    return weights, ignored


def _in_backbone(name: str, model: nn.Module) -> bool:
    """Whether `name` is inside the base model (e.g. `bert.`) of a task model; a bare model is all backbone."""
    prefix = str(getattr(model, "base_model_prefix", ""))
    return not (prefix and hasattr(model, prefix)) or name.startswith(prefix + ".")


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
    lazy: bool = False,
) -> tuple[dict[str, torch.Tensor], MaskSource]:
    """The masks of whichever form the folder uses, validated and at full shape, and the form's name.
    `lazy`: zeros in the weights are looked for per layer by the streaming export, not here."""
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
    if lazy:
        return {}, ZEROS_PER_LAYER
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
    model = new_model(md.config, initialize=False, task=md.task)
    result = model.load_state_dict(md.weights, strict=False)
    provided = set(md.adapter.head_tensors) if md.adapter is not None else set()
    missing = set(result.missing_keys) - tied_names(model) - provided
    if missing:
        raise InputError(md.path, f"tensor {sorted(missing)[0]!r} is missing")
    model = model.float().eval()
    if md.adapter is not None:
        model, md.lora_merge = merge_lora(model, md.adapter)
    masks_io.apply_masks_(model, md.masks)
    return model.eval()
