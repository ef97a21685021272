"""LoRA adapters: read and check a PEFT adapter against the model, then merge it with PEFT itself.

The merge is PEFT's own (`PeftModel.from_pretrained(...).merge_and_unload()`) so its scaling rules
hold exactly: lora_alpha/r, rslora (alpha/sqrt(r)), rank_pattern/alpha_pattern, DoRA. What we add is
what PEFT leaves to warnings: an adapter tensor that does not land in the model (peft #1746: an
adapter loaded onto a pruned base silently loses its LoRA tensors) is an error here, and so is an
adapter whose shapes do not fit, whose targets the model does not have, or that is not LoRA. Whole
modules the adapter saved (`modules_to_save`: a trained classifier, score or qa_outputs head) are merged by
PEFT like the LoRA tensors, and each must have its place in the exported task's model.
Adapters saved from a model with another head prefix (e.g. `bert.` from BertForSequenceClassification)
are mapped onto our model's module names through PEFT's `key_mapping`.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from export_errors import InputError
from exporter.model_dir.files import one_line, read_pickle_weights, read_safetensors

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_[A-Za-z_]+?)(?:\.(?P<param>weight|bias))?$")


@dataclass
class Adapter:
    """A LoRA adapter as read from disk, with its tensors' keys as stored (PEFT's saved format)."""

    path: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    key_mapping: dict[str, str] = field(default_factory=dict)  # stored module name -> ours, for PEFT
    head_tensors: set[str] = field(default_factory=set)  # our parameters the adapter carries whole

    @property
    def weights_file(self) -> Path:
        return self.path / (
            ADAPTER_SAFETENSORS if (self.path / ADAPTER_SAFETENSORS).exists() else ADAPTER_PICKLE
        )


@dataclass(frozen=True)
class LoraMerge:
    """What the merge did: the modules PEFT merged LoRA into, and the largest weight change."""

    merged_modules: tuple[str, ...]
    max_abs_delta: float


def read_adapter(path: Path, allow_pickle: bool = False) -> Adapter:
    """Read `adapter_config.json` (must be LoRA) and the adapter tensors, or raise an InputError."""
    from peft import LoraConfig

    if not path.is_dir():
        raise InputError(path, "adapter folder not found")
    raw = _read_json(path / ADAPTER_CONFIG)
    if raw.get("peft_type") != "LORA":
        raise InputError(
            path / ADAPTER_CONFIG,
            f"peft_type is {raw.get('peft_type')!r}, not 'LORA': only LoRA adapters can be merged",
        )
    try:
        config = LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError) as exc:
        raise InputError(path / ADAPTER_CONFIG, f"not a valid LoRA config ({exc})") from exc
    if (path / ADAPTER_SAFETENSORS).exists():
        tensors = read_safetensors(path / ADAPTER_SAFETENSORS)
    elif (path / ADAPTER_PICKLE).exists():
        tensors = read_pickle_weights(path / ADAPTER_PICKLE, allow_pickle)
    else:
        raise InputError(path, f"no adapter weights: expected {ADAPTER_SAFETENSORS}")
    if not tensors:
        raise InputError(path / ADAPTER_SAFETENSORS, "the adapter holds no tensors")
    return Adapter(path, config, tensors)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise InputError(path, "missing: a PEFT adapter folder needs adapter_config.json")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "not a JSON object")
    return data


def check_adapter(
    adapter: Adapter,
    model: nn.Module,
    normalize_module: Callable[[str], str | None],
    normalize_param: Callable[[str], str | None] | None = None,
    task: str = "exported",
) -> Adapter:
    """Check the adapter against `model` (a meta-device skeleton will do) and fill its key mapping.

    Every stored tensor must belong to a module of the model, and LoRA A/B must fit its Linear:
    A is [r, in_features], B is [out_features, r]. Every target module name must match a module. A whole
    module saved through `modules_to_save` (a trained classifier, score or qa_outputs head) must be a
    parameter of the model, of its shape, inside a module PEFT will load it into: an adapter tensor the
    exported model has no place for is an error naming it, never a warning."""
    modules = dict(model.named_modules())
    _check_targets(adapter, modules, normalize_module)
    where = adapter.weights_file
    for key, tensor in adapter.tensors.items():
        stored = key.removeprefix(PEFT_PREFIX)
        match = LORA_KEY.match(stored)
        if match is None:
            _check_saved_module(adapter, key, tensor, model, normalize_param, task)
            continue
        ours = normalize_module(match["module"])
        if ours is None:
            raise InputError(where, f"tensor {key!r}: the model has no module {match['module']!r}")
        if ours != match["module"]:
            adapter.key_mapping[f"^{re.escape(match['module'])}\\."] = f"{ours}."
        if not _targeted(adapter.config, ours):
            raise InputError(
                where,
                f"tensor {key!r}: module {ours!r} is not selected by target_modules, so PEFT would drop it",
            )
        rank = _rank(adapter.config, ours)
        _check_fit(key, tensor, match["kind"], match["param"], modules[ours], rank, where)
    return adapter


def _check_saved_module(
    adapter: Adapter,
    key: str,
    tensor: torch.Tensor,
    model: nn.Module,
    normalize_param: Callable[[str], str | None] | None,
    task: str,
) -> None:
    """A modules_to_save tensor: a parameter of the model, of its shape, in a module PEFT wraps."""
    where, stored = adapter.weights_file, key.removeprefix(PEFT_PREFIX)
    ours = normalize_param(stored) if normalize_param is not None else None
    if ours is None:
        raise InputError(
            where, f"tensor {key!r}: the {task} model has no parameter {stored!r} for it (pass --task?)"
        )
    shape = model.state_dict()[ours].shape
    if tuple(tensor.shape) != tuple(shape):
        raise InputError(
            where, f"tensor {key!r} has shape {list(tensor.shape)}; the model's {ours!r} is {list(shape)}"
        )
    if not _saved_by(adapter.config, ours.rsplit(".", 1)[0]):
        raise InputError(
            where, f"tensor {key!r}: no entry of modules_to_save covers it, so PEFT would drop it"
        )
    stored_module, our_module = stored.rsplit(".", 1)[0], ours.rsplit(".", 1)[0]
    if stored_module != our_module:
        adapter.key_mapping[f"^{re.escape(stored_module)}\\."] = f"{our_module}."
    adapter.head_tensors.add(ours)


def _saved_by(config: LoraConfig, module_name: str) -> bool:
    """Whether PEFT's modules_to_save wraps `module_name` or a module containing it (suffix match)."""
    to_save = list(getattr(config, "modules_to_save", None) or [])
    parts = module_name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p == m or p.endswith("." + m) for p in prefixes for m in to_save)


def _targeted(config: LoraConfig, module_name: str) -> bool:
    """Whether PEFT's own matching selects `module_name` for this config (so its tensors will load)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if getattr(config, "target_modules", None) in (None, "all-linear"):
        return True
    return bool(check_target_module_exists(config, module_name))


def _rank(config: LoraConfig, module_name: str) -> int:
    """The rank PEFT will give `module_name` (rank_pattern first, else r), by PEFT's own matching."""
    from peft.utils.other import get_pattern_key

    pattern: dict[str, int] = dict(config.rank_pattern or {})
    return int(pattern.get(get_pattern_key(list(pattern), module_name), config.r))


def _check_fit(
    key: str, tensor: torch.Tensor, kind: str, param: str | None, module: nn.Module, rank: int, where: Path
) -> None:
    """LoRA A must be [r, in] and B [out, r] for the module and the config's rank."""
    if isinstance(module, nn.Linear):
        dims = {"lora_A": (rank, module.in_features), "lora_B": (module.out_features, rank)}
        kind_text = f"Linear({module.in_features} -> {module.out_features}) with r={rank}"
    elif isinstance(module, nn.Embedding):
        dims = {
            "lora_embedding_A": (rank, module.num_embeddings),
            "lora_embedding_B": (module.embedding_dim, rank),
        }
        kind_text = f"Embedding({module.num_embeddings}, {module.embedding_dim}) with r={rank}"
    else:
        raise InputError(where, f"tensor {key!r}: LoRA on a {type(module).__name__} is not supported")
    expected = dims.get(kind)
    if expected is None or param == "bias":
        return
    if tuple(tensor.shape) != expected:
        raise InputError(
            where,
            f"tensor {key!r} has shape {list(tensor.shape)}, but the module is {kind_text}: expected {list(expected)}",
        )


def _check_targets(adapter: Adapter, modules: Mapping[str, nn.Module], normalize_module: Callable) -> None:
    targets = adapter.config.target_modules
    if targets is None or targets == "all-linear":
        return
    names = [n for n in modules if n]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise InputError(
                adapter.path / ADAPTER_CONFIG, f"target_modules {targets!r} match no module of the model"
            )
        return
    missing = [t for t in sorted(targets) if not _target_exists(t, names, normalize_module)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
        raise InputError(
            adapter.path / ADAPTER_CONFIG,
            f"target_modules {missing} match no module of the model (its linear layers: {', '.join(leaves)})",
        )


def _target_exists(target: str, names: list[str], normalize_module: Callable) -> bool:
    return normalize_module(target) is not None or any(n.endswith("." + target) for n in names)


def merge_lora(model: nn.Module, adapter: Adapter) -> tuple[nn.Module, LoraMerge]:
    """Merge the adapter into `model` with PEFT; returns the plain merged model and what was merged.

    Raises an InputError if any stored LoRA tensor did not load (PEFT would only warn)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    config = _merge_config(adapter.config, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peft_model = PeftModel.from_pretrained(
                model, str(adapter.path), config=config, key_mapping=adapter.key_mapping or None
            )
        except (RuntimeError, ValueError) as exc:
            raise InputError(
                adapter.weights_file, f"PEFT could not load the adapter: {one_line(exc)}"
            ) from exc
    _check_loaded(peft_model, adapter)
    layers = {_base_name(n): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    deltas = [float(m.get_delta_weight("default").abs().max()) for m in layers.values()]  # type: ignore[attr-defined]
    plain = peft_model.merge_and_unload()
    merged, delta = tuple(sorted(layers)), max(deltas, default=0.0)
    logger.info("merged LoRA into %d modules (max |dW| %.3g)", len(merged), delta)
    return plain, LoraMerge(merged, delta)


def _merge_config(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """A copy of the LoRA config for merging into our head-less model: plain PeftModel (no task head),
    modules_to_save kept only if the model has those modules."""
    import copy

    config = copy.deepcopy(config)
    config.task_type = None
    config.inference_mode = True
    to_save = getattr(config, "modules_to_save", None)
    if to_save:
        names = [n for n, _ in model.named_modules()]
        kept = [m for m in to_save if any(n == m or n.endswith("." + m) for n in names)]
        if kept != list(to_save):  # e.g. PEFT's SEQ_CLS default ["classifier", "score"] on a BERT model
            logger.info(
                "adapter modules_to_save %s name no module of the model and carry no tensors (checked)",
                sorted(set(to_save) - set(kept)),
            )
        config.modules_to_save = kept or None
    return config


def _check_loaded(peft_model: nn.Module, adapter: Adapter) -> None:
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(peft_model)
    lost = []
    for key, tensor in adapter.tensors.items():
        mapped = _mapped_key(key, adapter.key_mapping)
        got = loaded.get(mapped)
        if got is None or got.shape != tensor.shape or not torch.equal(got.float(), tensor.float()):
            lost.append(key)
    if lost:
        raise InputError(
            adapter.weights_file,
            f"{len(lost)} of the adapter's tensors did not load into the model (e.g. {lost[0]!r})",
        )


def _mapped_key(key: str, key_mapping: Mapping[str, str]) -> str:
    stored = key.removeprefix(PEFT_PREFIX)
    for pattern, replacement in key_mapping.items():
        new, count = re.subn(pattern, replacement, stored)
        if count:
            stored = new
            break
    return PEFT_PREFIX + stored if key.startswith(PEFT_PREFIX) else stored


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix(PEFT_PREFIX)


def adapter_module(adapter: Adapter, key: str) -> str | None:
    """Our module name a stored LoRA tensor belongs to (None for a modules_to_save tensor)."""
    match = LORA_KEY.match(_mapped_key(key, adapter.key_mapping).removeprefix(PEFT_PREFIX))
    return None if match is None else match["module"]


def merge_lora_piece(
    container: nn.Module, adapter: Adapter, prefixes: tuple[str, ...]
) -> tuple[nn.Module, LoraMerge]:
    """Merge the adapter's LoRA tensors for the modules under `prefixes` into `container`, with PEFT.

    `container` holds one piece of the model (a decoder layer, the embeddings, the LM head) under the
    model's own module names, so PEFT's matching (target_modules, rank_pattern / alpha_pattern keys,
    layers_to_transform) sees exactly the names it sees on the whole model, and its merge (scaling,
    rsLoRA, DoRA) is the one `merge_lora` applies to the whole model. Used by the streaming export,
    one piece at a time. Raises an InputError if a tensor of the piece did not load."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    piece = {
        key: tensor
        for key, tensor in adapter.tensors.items()
        if (module := adapter_module(adapter, key)) is not None and module.startswith(prefixes)
    }
    if not piece:
        return container, LoraMerge((), 0.0)
    stored = {_mapped_key(key, adapter.key_mapping): tensor for key, tensor in piece.items()}
    stored = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in stored.items()}
    config = _merge_config(adapter.config, container)
    config.modules_to_save = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peft_model = PeftModel(container, config)
            set_peft_model_state_dict(peft_model, stored)
        except (RuntimeError, ValueError) as exc:
            raise InputError(
                adapter.weights_file, f"PEFT could not load the adapter: {one_line(exc)}"
            ) from exc
    loaded = get_peft_model_state_dict(peft_model)
    lost = [
        key
        for key, tensor in stored.items()
        if (got := loaded.get(key)) is None
        or got.shape != tensor.shape
        or not torch.equal(got.float(), tensor.float())
    ]
    if lost:
        raise InputError(
            adapter.weights_file,
            f"{len(lost)} of the adapter's tensors did not load into the model (e.g. {lost[0]!r})",
        )
    layers = {_base_name(n): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    deltas = [float(m.get_delta_weight("default").abs().max()) for m in layers.values()]  # type: ignore[attr-defined]
    plain = peft_model.merge_and_unload()
    return plain, LoraMerge(tuple(sorted(layers)), max(deltas, default=0.0))
