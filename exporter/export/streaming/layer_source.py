"""One piece of the model at a time, read from the checkpoint, LoRA-merged and masked: the streamed reference.

A meta-device skeleton of the HF class gives every module's type and name without memory. A piece (the
embeddings, decoder layer i, the final norm + LM head) is a copy of the skeleton's modules loaded with
`load_state_dict(assign=True)` from the checkpoint, one tensor at a time, converted from the checkpoint's
dtype to fp32 only then (exporter/model_dir/lazy_weights.py). The LoRA merge is PEFT's, run on a holder
that puts the piece under the whole model's module names (`lora.merge_lora_piece`), so rank/alpha
patterns and layer selections match as on the whole model; then the piece's masks are multiplied in
(zeros-in-weights masks are found here, on the piece's checkpoint tensors). So each piece equals the
same part of `build_reference_model`'s model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from export_errors import InputError
from exporter.model_dir import masks as masks_io
from exporter.model_dir.loader import ZEROS_PER_LAYER, ModelDir, new_model, tied_names
from exporter.model_dir.lora import LoraMerge, adapter_module, merge_lora_piece
from exporter.restructure.families import family_for


class LayerSource:
    """Builds the pieces of `md` (a `load_model_dir(..., lazy=True)` ModelDir) one at a time."""

    def __init__(self, md: ModelDir) -> None:
        if md.adapter is not None and md.adapter.head_tensors:
            raise InputError(
                md.adapter.weights_file,
                "the streaming export merges LoRA per layer and does not take modules_to_save tensors "
                f"({sorted(md.adapter.head_tensors)[0]!r}); pass --streaming off",
            )
        self.md = md
        self.family = family_for(md.model_type)
        self.skeleton: Any = new_model(md.config, device="meta", task=md.task)
        self.meta_layers = list(self.family.layers(self.skeleton))
        self.head_dim = int(self.family.head_dim(self.skeleton))
        self.merges: list[LoraMerge] = []
        self.tied = tied_names(self.skeleton)
        self._claimed: set[str] = set()

    @property
    def num_layers(self) -> int:
        return len(self.meta_layers)

    def attention_types(self) -> list[str | None]:
        return [getattr(layer, "attention_type", None) for layer in self.meta_layers]

    def prefix_shell(self, embeddings: bool = True) -> nn.Module:
        """The causal LM with real embeddings (unless `embeddings` is False: the caller streams the table),
        rotary embedding and final norm; every other module on meta."""
        shell = copy.deepcopy(self.skeleton)
        base = shell.model
        self._fill(shell, ("model.embed_tokens.", "model.norm.") if embeddings else ("model.norm.",))
        with torch.device("cpu"):
            base.rotary_emb = type(base.rotary_emb)(config=self.md.config)
        return shell

    def layer(self, index: int) -> nn.Module:
        """Decoder layer `index`, fp32, LoRA merged, masked (the reference's layer)."""
        holder = nn.Module()
        holder.model = nn.Module()
        holder.model.layers = nn.ModuleList(
            [nn.Identity() for _ in range(index)] + [copy.deepcopy(self.meta_layers[index])]
        )
        holder = self._fill(holder, (f"model.layers.{index}.",))
        layer: nn.Module = holder.model.layers[index]
        return layer.eval()

    def suffix(self) -> tuple[nn.Module, nn.Module]:
        """(final norm, LM head), fp32, merged, masked; a tied head reads the embedding table."""
        holder = nn.Module()
        holder.model = nn.Module()
        holder.model.norm = copy.deepcopy(self.skeleton.model.norm)
        holder.lm_head = copy.deepcopy(self.skeleton.lm_head)
        holder = self._fill(holder, ("model.norm.", "lm_head."))
        return holder.model.norm.eval(), holder.lm_head.eval()

    @torch.no_grad()
    def _fill(self, holder: nn.Module, prefixes: tuple[str, ...]) -> Any:
        """Load the checkpoint tensors of the modules under `prefixes` into `holder` (meta modules named as
        in the model), merge the adapter's LoRA for them, apply their masks; returns the holder to use."""
        md = self.md
        wanted = [
            name for name, _ in holder.named_parameters(remove_duplicate=False) if name.startswith(prefixes)
        ]
        state: dict[str, torch.Tensor] = {}
        for name in wanted:
            source = "model.embed_tokens.weight" if name in self.tied and name not in md.weights else name
            if source not in md.weights:
                raise InputError(md.path, f"tensor {name!r} is missing")
            state[name] = md.weights[source].load().to(torch.float32)  # type: ignore[union-attr]
        holder.load_state_dict(state, strict=False, assign=True)
        masks = {name: mask for name, mask in md.masks.items() if name.startswith(prefixes)}
        if md.mask_source == ZEROS_PER_LAYER:
            linear = [
                f"{n}.weight"
                for n, m in holder.named_modules()
                if isinstance(m, nn.Linear) and n != "lm_head"
            ]
            masks.update(masks_io.masks_from_zeros(state, [n for n in linear if n.startswith(prefixes)]))
        self._claimed.update(masks)
        if md.adapter is not None:
            holder, merge = merge_lora_piece(holder, md.adapter, prefixes)
            self.merges.append(merge)
        masks_io.apply_masks_(holder, masks)
        return holder

    def plain_table(self, name: str) -> torch.Tensor | None:
        """The checkpoint tensor `name` (the embedding table or LM head weight) as stored, when neither a mask
        nor an adapter tensor touches it (so it can be streamed as is: exporter/export/streaming/tables.py)."""
        md = self.md
        stored = "model.embed_tokens.weight" if name in self.tied and name not in md.weights else name
        lazy = md.weights.get(stored)
        adapter_modules = set()
        if md.adapter is not None:
            adapter_modules = {adapter_module(md.adapter, k) for k in md.adapter.tensors}
        if (
            lazy is None
            or {name, stored} & set(md.masks)
            or {n.rsplit(".", 1)[0] for n in (name, stored)} & adapter_modules
        ):
            return None
        return lazy.load()  # type: ignore[union-attr]

    def suffix_norm(self) -> nn.Module:
        """The final norm alone (the LM head streamed as a table)."""
        holder = nn.Module()
        holder.model = nn.Module()
        holder.model.norm = copy.deepcopy(self.skeleton.model.norm)
        holder = self._fill(holder, ("model.norm.",))
        return holder.model.norm.eval()

    def unclaimed_masks(self) -> list[str]:
        """Masks naming no parameter any piece loaded (after every piece was built)."""
        return sorted(set(self.md.masks) - self._claimed)

    def lora_merge(self) -> LoraMerge | None:
        if self.md.adapter is None:
            return None
        modules = tuple(sorted(m for merge in self.merges for m in merge.merged_modules))
        return LoraMerge(modules, max((m.max_abs_delta for m in self.merges), default=0.0))
