"""torch -> ONNX for encoders and causal LMs (no KV cache), with dynamic batch and sequence axes.

Exporter choice, by measurement (issue 3): on all-MiniLM-L6-v2 at 8x128 the TorchScript-based
exporter (`dynamo=False`) gave an ONNX that ran about 25% faster in ONNX Runtime than the dynamo
export, and the graph passes' attention patterns are written against its output. Models are
exported with `attn_implementation="eager"` so attention is the plain MatMul/Softmax/MatMul
pattern the fusions recognise, whatever the attention code the user trained with.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from exporter.export import external_data
from exporter.export.rope import traceable_rotary
from exporter.model_dir.pooling import Pooling

logger = logging.getLogger(__name__)

OPSET = 17
EXPORTER = "torchscript"
EXPORTER_REASON = (
    "TorchScript exporter (dynamo=False): its graph ran ~25% faster in ONNX Runtime than the dynamo "
    "export on all-MiniLM-L6-v2 at 8x128, and the fusion patterns target it"
)


class EncoderForExport(nn.Module):
    """Wraps an HF encoder so the ONNX has HF input names and `last_hidden_state`
    (and `sentence_embedding` when the model folder carries a sentence-transformers pooling).

    The model gets the padding mask already in additive [B, 1, 1, S] form (`additive_padding_mask`),
    which HF passes through unchanged: the export then holds 5 mask ops instead of the ~45 that HF's mask
    builder traces to (Range / Expand / Where over [B, 1, S, S]), and graph_passes can recognise it and
    hand ONNX Runtime's Attention the 2-D mask itself."""

    def __init__(self, model: nn.Module, uses_token_type_ids: bool, pooling: Pooling | None) -> None:
        super().__init__()
        self.model = model
        self.uses_token_type_ids = uses_token_type_ids
        self.pooling = pooling

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if self.uses_token_type_ids else [])

    @property
    def output_names(self) -> list[str]:
        return ["last_hidden_state"] + (["sentence_embedding"] if self.pooling else [])

    def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[no-untyped-def]
        dtype = next(self.model.parameters()).dtype
        kwargs = {"input_ids": input_ids, "attention_mask": additive_padding_mask(attention_mask, dtype)}
        if self.uses_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model(**kwargs).last_hidden_state
        if self.pooling is None:
            return hidden
        return hidden, pool(hidden, attention_mask, self.pooling)


def additive_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] of 0/1 -> [B, 1, 1, S]: 0 where attended, the dtype's minimum where padded.

    The values HF's eager bidirectional mask holds (`where(mask, 0, finfo.min)`), broadcast over query rows
    instead of materialised as [B, 1, S, S]: scores + mask are the same numbers."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """The sentence embedding as sentence-transformers computes it."""
    if pooling.mode == "cls":
        emb = hidden[:, 0]
    elif pooling.mode == "max":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden + (mask - 1.0) * 1e9).max(dim=1).values
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if pooling.normalize:
        emb = torch.nn.functional.normalize(emb, p=2.0, dim=-1)
    return emb


class CausalLMForExport(nn.Module):
    """Wraps an HF causal LM: (input_ids, attention_mask) -> logits, without a KV cache.

    `positions_from_mask`: position ids counted over real tokens only (cumsum of the mask - 1), as HF
    `generate` and the KV-cache decoder compute them, so a left-padded row gets the logits generation
    would. This is the reference of the decoder-with-past export, whose prompts are padded on the left;
    without it HF counts positions from the first (padded) slot."""

    input_names = ("input_ids", "attention_mask")
    output_names = ("logits",)

    def __init__(self, model: nn.Module, positions_from_mask: bool = False) -> None:
        super().__init__()
        self.model = model
        self.positions_from_mask = positions_from_mask

    def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
        kwargs = {}
        if self.positions_from_mask:
            positions = attention_mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = positions.masked_fill(attention_mask == 0, 1)
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        ).logits


def input_names_for(wrapper: nn.Module) -> list[str]:
    """The wrapper's ONNX inputs (every export wrapper names its own)."""
    return list(wrapper.input_names)  # type: ignore[arg-type]


def output_names_for(wrapper: nn.Module) -> list[str]:
    """The wrapper's ONNX outputs, Optimum's names for the task."""
    return list(wrapper.output_names)  # type: ignore[arg-type]


def default_dynamic_axes(inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    """Optimum's axis names: batch and sequence on every input and output, batch alone on a pooled one."""
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in [*inputs, *outputs]}
    if "sentence_embedding" in axes:
        axes["sentence_embedding"] = {0: "batch_size"}
    return axes


class ExportArguments(NamedTuple):
    """`torchscript_export`'s arguments after the module and before the path, for an export wrapper."""

    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def export_arguments(
    wrapper: nn.Module,
    example: dict[str, torch.Tensor],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> ExportArguments:
    """The wrapper's inputs taken from `example` in its input order, its names, and `dynamic_axes` (default
    Optimum's names on every input and output)."""
    inputs = input_names_for(wrapper)
    outputs = output_names_for(wrapper)
    args = tuple(example[name] for name in inputs)
    return ExportArguments(args, inputs, outputs, dynamic_axes or default_dynamic_axes(inputs, outputs))


def export_to_onnx(
    wrapper: nn.Module,
    example: dict[str, torch.Tensor],
    path: str | Path,
    opset: int = OPSET,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Export `wrapper` (an export wrapper: `EncoderForExport`, `CausalLMForExport`, a task head) with
    dynamic batch/sequence axes (`dynamic_axes`, default Optimum's names on every input and output).

    Weights over the protobuf limit go to one `<path name>.data` file beside `path` (see
    exporter/export/external_data.py); ONNX Runtime and onnx.load find it from the model's folder."""
    path = Path(path)
    args, inputs, outputs, dynamic_axes = export_arguments(wrapper, example, dynamic_axes)
    large = external_data.needs_external_data(wrapper)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchscript_export(wrapper, args, path, inputs, outputs, dynamic_axes, opset)
    logger.info("exported %s (opset %d, %s%s)", path, opset, EXPORTER, ", external data" if large else "")
    return path


def torchscript_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    external: bool | None = None,
) -> Path:
    """The export to a file (the TorchScript exporter, see EXPORTER_REASON); a model over the protobuf limit
    comes out as `path` + one `<name>.data` file (exporter/export/external_data.py). `external`: force (True)
    or forbid (False) the one-data-file layout."""
    large = external_data.needs_external_data(module) if external is None else external
    with external_data.export_target(path, large) as target:
        _torch_onnx_export(module, args, str(target), input_names, output_names, dynamic_axes, opset)
    return path


def torchscript_export_bytes(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> bytes | None:
    """The bytes `torchscript_export` writes for a model that fits in one file, made in memory: torch writes
    the one serialized proto it made to a path or to a file object alike. None for a model that needs
    external data (`needs_external_data`, or an export torch finds over the 2 GiB protobuf limit, e.g. with
    tied weights stored twice): `torchscript_export` writes those, in the one-data-file layout."""
    if external_data.needs_external_data(module):
        return None
    kept = _KeptBytes()
    try:
        _torch_onnx_export(module, args, kept, input_names, output_names, dynamic_axes, opset)
    except RuntimeError as exc:
        if _OVER_PROTOBUF_LIMIT in str(exc):
            return None
        raise
    return kept.data()


# torch's refusal to make an export over the protobuf limit anywhere but at a path (torch/csrc/jit/serialization)
_OVER_PROTOBUF_LIMIT = "larger than the 2GiB limit"


class _KeptBytes:
    """A file object for torch.onnx.export that keeps the bytes written to it: io.BytesIO would copy them
    (measured 0.17-0.2 s for the 45M Llama's 221 MB, fresh pages and memcpy, under the GIL)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(data)
        return len(data)

    def flush(self) -> None:
        pass

    def data(self) -> bytes:
        return b"".join(self._chunks)  # one chunk (torch writes the proto once): that object, not a copy


def _torch_onnx_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    target: str | _KeptBytes,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """The one call of torch.onnx.export, to a path or into memory. Rotary embeddings whose frequencies
    change at run time are traced from the positions (exporter/export/rope.py)."""
    with warnings.catch_warnings(), torch.no_grad(), traceable_rotary(module):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            target,  # type: ignore[arg-type]  # a file object: torch writes the serialized proto to it
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
