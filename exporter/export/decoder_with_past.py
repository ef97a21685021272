"""Causal LM -> one decoder ONNX with a KV cache (past/present), per-layer KV widths as pruned.

Inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value`; outputs
`logits`, `present.{i}.key|value`: the names Optimum's ORTModelForCausalLM and ONNX Runtime users
expect. Batch, sequence and past-length axes are dynamic; a past of length 0 is the prefill.

Why not Optimum: its dummy-cache generator sizes every layer's past from config.json, but after
structural pruning layer i has its own `n_kv_i` (k_proj.out_features // head_dim) while config.json
still says the original count. Here the shapes are read from each layer's projections, checked
for consistency, exported as static head counts, and recorded in a `DecoderManifest`.

A layer whose attention the restructure removed (every KV group dead) has no past and no present: the
names keep the layer's own index (`past_key_values.{i}.*` only for the layers in
`DecoderManifest.cache_layers`), and the manifest's `layers[i]` is None for the others.

Exporter: TorchScript (`dynamo=False`), as in `onnx_export` (the fusions target its graph). A
wrapper rebuilds a transformers `DynamicCache` from the flat past tensors, so the model's own
forward (rotary, causal+padding mask, eager GQA attention) is what gets traced: the ONNX computes
exactly what `model(..., cache=...)` computes. The export is checked on ONNX Runtime against
PyTorch before it is returned (prefill with an empty past, then a decode step with padding).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from export_errors import InputError, ValidationError
from exporter.export.in_memory import start_export
from exporter.export.torch_to_onnx import EXPORTER
from exporter.restructure.families.llama import renumber_cache_slots
from exporter.validate.tolerances import tolerance

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
TASK = "text-generation-with-past"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


@dataclasses.dataclass(frozen=True)
class LayerAttentionShape:
    """One decoder layer's attention as pruned: query heads, KV heads, head size."""

    n_q: int
    n_kv: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.n_q // self.n_kv


def cache_layers(shapes: tuple[LayerAttentionShape | None, ...]) -> tuple[int, ...]:
    """Indices of the layers that carry a KV cache (those that kept an attention), in order."""
    return tuple(i for i, shape in enumerate(shapes) if shape is not None)


@dataclasses.dataclass(frozen=True)
class DecoderManifest:
    """What the exported decoder expects: per-layer KV shapes ([batch, n_kv, past, head_dim]) and names;
    `layers[i]` is None for a layer without attention (no past, no present)."""

    layers: tuple[LayerAttentionShape | None, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    vocab_size: int
    dtype: str
    opset: int
    model_type: str
    task: str = TASK
    exporter: str = EXPORTER
    validation_max_abs_error: float | None = None

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """The layers with a `past_key_values.{i}.*` input and a `present.{i}.*` output."""
        return cache_layers(self.layers)

    def past_shape(self, layer: int, batch: int, past_length: int) -> tuple[int, int, int, int]:
        shape = self.layers[layer]
        if shape is None:
            raise InputError(
                f"layer {layer}", "has no attention (removed by the restructure), so no KV cache"
            )
        return batch, shape.n_kv, past_length, shape.head_dim

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the lead saves it beside the ONNX)."""
        data = dataclasses.asdict(self)
        data["layers"] = [None if layer is None else dataclasses.asdict(layer) for layer in self.layers]
        data["cache_layers"] = list(self.cache_layers)
        data["dynamic_axes"] = {
            name: {str(k): v for k, v in axes.items()} for name, axes in self.dynamic_axes.items()
        }
        return data


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (`model.model.layers`), with a clear error otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            "config.json",
            f"model_type {model_type!r} has no KV-cache export; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    layers: nn.ModuleList = model.model.layers
    return layers


def layer_attention_shapes(model: Any) -> tuple[LayerAttentionShape | None, ...]:
    """Per-layer (n_q, n_kv, head_dim) read from the projections' widths, not from config.json; None
    for a layer whose attention the restructure removed."""
    return tuple(
        None if getattr(layer, "self_attn", None) is None else _attention_shape(layer.self_attn, i)
        for i, layer in enumerate(decoder_layers(model))
    )


def _attention_shape(attn: Any, index: int) -> LayerAttentionShape:
    where = f"model.layers.{index}.self_attn"
    head_dim = int(attn.head_dim)
    q_out, k_out, v_out = attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features
    if q_out % head_dim or k_out % head_dim or k_out != v_out or attn.o_proj.in_features != q_out:
        raise InputError(
            where,
            f"inconsistent projection widths q={q_out} k={k_out} v={v_out} o_in={attn.o_proj.in_features} "
            f"for head_dim {head_dim}",
        )
    n_q, n_kv = q_out // head_dim, k_out // head_dim
    if n_kv == 0 or n_q % n_kv:
        raise InputError(where, f"{n_q} query heads cannot be grouped over {n_kv} KV heads")
    if attn.num_key_value_groups != n_q // n_kv:
        raise InputError(
            where,
            f"num_key_value_groups is {attn.num_key_value_groups} but the projections give "
            f"{n_q} q heads / {n_kv} kv heads = {n_q // n_kv}",
        )
    return LayerAttentionShape(n_q=n_q, n_kv=n_kv, head_dim=head_dim)


class DecoderWithPastForExport(nn.Module):
    """(input_ids, attention_mask, position_ids, *flat past) -> (logits, *flat present).

    The flat past is turned back into a `DynamicCache` so the HF forward runs unchanged; the
    cache's layers after the forward are the presents (past concatenated with the new keys/values).
    The cache holds one entry per layer that kept an attention, in layer order (the restructure numbers
    their `layer_idx` so: `renumber_cache_slots`); removed attentions never touch it.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.cache_layers = renumber_cache_slots(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
        cache = DynamicCache()
        for slot in range(len(self.cache_layers)):
            cache.update(past[2 * slot], past[2 * slot + 1], slot)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def io_names(layers: int | Sequence[int]) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes of the decoder-with-past ONNX: a past and a present
    for each layer in `layers` (the cache layers; an int n means layers 0..n-1)."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for i in range(layers) if isinstance(layers, int) else layers:
        for name in past_names(i):
            inputs.append(name)
            axes[name] = {0: "batch_size", 2: "past_sequence_length"}
        for name in present_names(i):
            outputs.append(name)
            axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    return inputs, outputs, axes


def positions_from_mask(attention_mask: np.ndarray, sequence_length: int) -> np.ndarray:
    """Position ids of the last `sequence_length` tokens for a left-padded mask (as HF generate does)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -sequence_length:].astype(np.int64)


def example_feeds(
    shapes: tuple[LayerAttentionShape | None, ...],
    vocab_size: int,
    batch: int,
    past: int,
    seq: int,
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random feeds; row 0 is left-padded by one token when there is room, so tracing and validation
    take the padding path of the mask, not an all-ones shortcut."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + seq), dtype=np.int64)
    if past + seq > 1:
        mask[0, 0] = 0
    feeds = {
        "input_ids": rng.integers(0, vocab_size, (batch, seq), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": positions_from_mask(mask, seq),
    }
    for i, shape in enumerate(shapes):
        if shape is None:
            continue
        for name in past_names(i):
            feeds[name] = rng.standard_normal((batch, shape.n_kv, past, shape.head_dim)).astype(np.float32)
    return feeds


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Export with eager attention (the MatMul/Softmax/MatMul pattern the fusions know); restore after."""
    previous = model.config._attn_implementation
    if previous != "eager":
        logger.info("switching attention from %s to eager for export", previous)
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


def export_decoder_with_past(model: nn.Module, path: Path, *, opset: int = 17) -> DecoderManifest:
    """Export `model` (an HF Llama/Mistral/Qwen2 causal LM, possibly pruned per layer) to one
    decoder-with-past ONNX at `path`, check it on ONNX Runtime, and return its manifest."""
    return export_decoder(model, path, opset=opset)[0]


def export_decoder(model: nn.Module, path: Path, *, opset: int = 17) -> tuple[DecoderManifest, bytes | None]:
    """`export_decoder_with_past`, also giving the file's bytes (None for a model with external data): made
    in memory and checked while a thread writes them (exporter/export/in_memory.py), for the graph passes to
    parse instead of reading the file back."""
    if opset < 17:
        raise InputError("--opset", f"decoder export needs opset >= 17, got {opset}")
    path = Path(path)
    hf: Any = model  # an HF PreTrainedModel: attributes mypy cannot see on nn.Module
    shapes = layer_attention_shapes(hf)
    if not cache_layers(shapes):
        raise InputError(
            "pruning masks",
            "every layer's attention is dead (all KV groups masked): the model has no attention left, so "
            "there is no KV cache to export; it cannot use context (each token's logits depend on it alone)",
        )
    vocab_size = int(hf.get_output_embeddings().out_features)
    inputs, outputs, axes = io_names(cache_layers(shapes))
    wrapper = DecoderWithPastForExport(model).eval()
    trace_feeds = example_feeds(shapes, vocab_size, batch=2, past=3, seq=4)
    args = tuple(torch.from_numpy(trace_feeds[name]) for name in inputs)
    with eager_attention(model):
        exported = start_export(wrapper, args, path, inputs, outputs, axes, opset)
    # the session is built while the file is written; the export stage's check reuses it (sessions.shared)
    with exported.checked() as session, torch.no_grad():
        max_error = validate_decoder(wrapper, session, path, shapes, vocab_size)
    logger.info(
        "exported decoder with past %s (opset %d, %d layers, %d with a KV cache, max abs error %.2e)",
        path,
        opset,
        len(shapes),
        len(cache_layers(shapes)),
        max_error,
    )
    manifest = DecoderManifest(
        layers=shapes,
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        dynamic_axes=axes,
        vocab_size=vocab_size,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        opset=opset,
        model_type=str(hf.config.model_type),
        validation_max_abs_error=max_error,
    )
    return manifest, exported.data


def validate_decoder(
    wrapper: DecoderWithPastForExport,
    session: Any,
    path: Path,
    shapes: tuple[LayerAttentionShape | None, ...],
    vocab_size: int,
) -> float:
    """`session` (the export at `path` on ORT, graph optimizations off) vs PyTorch on a prefill with an empty
    past and a padded decode step, shapes other than the traced ones. Raises ValidationError beyond the fp32
    tolerance."""
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    for batch, past, seq in ((1, 0, 5), (3, 6, 1)):
        feeds = example_feeds(shapes, vocab_size, batch, past, seq, seed=1)
        got = session.run(None, feeds)
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(feeds[i.name]) for i in session.get_inputs()))
        for name, g, w in zip(names, got, want):
            case = f"{path}: {name} at batch={batch} past={past} seq={seq}"
            if g.shape != tuple(w.shape):
                raise ValidationError(f"{case}: ONNX shape {g.shape}, PyTorch shape {tuple(w.shape)}")
            error = np.abs(g - w.numpy())
            if error.max() > tolerance("fp32").max_abs:
                where = np.unravel_index(int(error.argmax()), error.shape)
                raise ValidationError(f"{case}: max abs error {error.max():.3e} vs PyTorch at index {where}")
            worst = max(worst, float(error.max()))
    return worst


def tensorrt_profile(
    manifest: DecoderManifest, *, max_batch: int, max_prompt: int, max_total: int, phase: str = "both"
) -> dict[str, dict[str, tuple[int, ...]]]:
    """TensorRT optimization profile {"min"|"opt"|"max": {input name: shape}} for the decoder.

    `phase="both"` is one profile serving prefill (past 0, up to `max_prompt` new tokens) and decode
    (1 new token, past up to `max_total - 1`); "prefill" and "decode" give the two narrower profiles
    an engine can carry separately so each gets kernels tuned to its shapes. "opt" is the common case
    at full batch: one new token over a half-full past ("both", "decode"), the full prompt ("prefill").
    """
    if not 1 <= max_prompt <= max_total or max_batch < 1:
        raise InputError(
            "tensorrt profile",
            f"need 1 <= max_prompt <= max_total and max_batch >= 1, got batch={max_batch} "
            f"prompt={max_prompt} total={max_total}",
        )
    seq, past = _phase_ranges(phase, max_prompt, max_total)
    profile: dict[str, dict[str, tuple[int, ...]]] = {}
    for level, index in (("min", 0), ("opt", 1), ("max", 2)):
        batch = 1 if level == "min" else max_batch
        s, p = seq[index], past[index]
        shapes: dict[str, tuple[int, ...]] = {
            "input_ids": (batch, s),
            "attention_mask": (batch, min(p + s, max_total)),
            "position_ids": (batch, s),
        }
        for i in manifest.cache_layers:
            for name in past_names(i):
                shapes[name] = manifest.past_shape(i, batch, p)
        profile[level] = shapes
    return profile


def _phase_ranges(
    phase: str, max_prompt: int, max_total: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(min, opt, max) of the new-token length and of the past length for a phase."""
    if phase == "prefill":
        return (1, max_prompt, max_prompt), (0, 0, 0)
    if phase == "decode":
        return (1, 1, 1), (0, max(max_total // 2, 0), max_total - 1)
    if phase == "both":
        return (1, 1, max_prompt), (0, max_total // 2, max_total - 1)
    raise InputError("tensorrt profile", f"phase must be 'prefill', 'decode' or 'both', got {phase!r}")
