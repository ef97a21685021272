"""Inputs for benchmarking: shapes from a trtexec `--shapes` spec, feeds loaded from `.npz` or made up.

Made-up feeds must be *valid* for a language model, or the benchmark measures an error path (an
out-of-range Gather) instead of the model: `input_ids` are uniform random token ids in
[0, vocab_size), `attention_mask` ones, `token_type_ids` and any other integer input zeros, float
inputs uniform in [-1, 1). The vocabulary size is read from the model itself (the row count of the
embedding table the `input_ids` Gather reads, also through Cast/DequantizeLinear and ORT's
EmbedLayerNormalization) or else from a `config.json` beside the model.

Dimensions: a symbolic dimension takes its value from `--shapes` (by name, so giving `input_ids:8x128`
also sizes `attention_mask`), else batch 1 on axis 0 and sequence 128 on other axes.

KV-cache decoders (exporter/export/decoder_with_past.py names: `past_sequence_length`, `total_sequence_length`):
the past is empty unless `--shapes` sizes a past input (a prefill of `sequence_length` tokens by default;
`--shapes=input_ids:1x1,past_key_values.0.key:1xKx128xH` times one decode step after 128 tokens; any one
past input sizes them all, so a model whose layer 0 lost its attention, and with it `past_key_values.0.*`,
takes the first past it has), the attention mask covers past + new tokens, and `position_ids` continue
from the past, as generation feeds them. Only the pasts the model has are fed (the decoder manifest's
`cache_layers`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from engines.base import TensorSpec
from export_errors import InputError

DEFAULT_BATCH = 1
DEFAULT_SEQUENCE = 128
_PASSTHROUGH_OPS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}
_TABLE_OPS = {"DequantizeLinear", "Identity", "Cast"}
PAST, TOTAL, NEW = "past_sequence_length", "total_sequence_length", "sequence_length"


def parse_shapes(spec: str, flag: str = "--shapes") -> dict[str, tuple[int, ...]]:
    """`input_ids:8x128,attention_mask:8x128` -> {"input_ids": (8, 128), ...}; a bad spec names the flag."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, dims = item.rpartition(":")
        name = name.strip("'")
        if not sep or not name:
            raise InputError(flag, f"{item!r} is not NAME:DxDx... (e.g. input_ids:8x128)")
        try:
            shape = tuple(int(d) for d in dims.split("x")) if dims else ()
        except ValueError:
            raise InputError(flag, f"{item!r}: dimensions must be integers separated by 'x'") from None
        if any(d < 1 for d in shape):
            raise InputError(flag, f"{item!r}: dimensions must be >= 1")
        shapes[name] = shape
    return shapes


def resolve_shapes(
    specs: Sequence[TensorSpec], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """A concrete shape per input: --shapes, then symbolic dims named in --shapes, then the defaults."""
    known = {spec.name for spec in specs}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise InputError("--shapes", f"unknown input(s) {unknown}; the model's inputs are {sorted(known)}")
    named = _symbolic_values(specs, shapes)
    if any(PAST in spec.shape for spec in specs):  # a KV-cache decoder: lengths that agree
        named.setdefault(PAST, 0)
        named.setdefault(TOTAL, named[PAST] + named.get(NEW, DEFAULT_SEQUENCE))
        named.setdefault(NEW, named[TOTAL] - named[PAST])
    resolved = {}
    for spec in specs:
        if spec.name in shapes:
            resolved[spec.name] = _checked(spec, shapes[spec.name])
            continue
        resolved[spec.name] = tuple(_dim(d, axis, named) for axis, d in enumerate(spec.shape))
    return resolved


def _symbolic_values(specs: Sequence[TensorSpec], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    named: dict[str, int] = {}
    for spec in specs:
        if spec.name in shapes:
            for d, value in zip(spec.shape, shapes[spec.name]):
                if isinstance(d, str) and d:
                    named.setdefault(d, value)
    return named


def _checked(spec: TensorSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) != len(spec.shape):
        raise InputError(
            "--shapes", f"input {spec.name!r} has rank {len(spec.shape)} {spec.shape}, got {shape}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape)):
        if isinstance(want, int) and want >= 0 and want != got:
            raise InputError("--shapes", f"input {spec.name!r} axis {axis} is fixed at {want}, got {got}")
    return shape


def _dim(d: int | str, axis: int, named: Mapping[str, int]) -> int:
    if isinstance(d, int) and d >= 0:
        return d
    if isinstance(d, str) and d in named:
        return named[d]
    return DEFAULT_BATCH if axis == 0 else DEFAULT_SEQUENCE


def make_feeds(
    specs: Sequence[TensorSpec], shapes: Mapping[str, tuple[int, ...]], vocab_size: int | None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Valid made-up feeds (see module docstring); `vocab_size` is required if there is an `input_ids`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = shapes[spec.name]
        if spec.name == "input_ids":
            if vocab_size is None:
                raise InputError("input_ids", "vocabulary size unknown; pass --loadInputs=FILE.npz")
            feeds[spec.name] = rng.integers(0, vocab_size, size=shape).astype(spec.dtype)
        elif spec.name == "attention_mask" or spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif spec.name == "position_ids" and len(shape) == 2 and "attention_mask" in shapes:
            start = shapes["attention_mask"][-1] - shape[1]  # after the past, as generation continues
            feeds[spec.name] = np.broadcast_to(np.arange(start, start + shape[1]), shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.uniform(-1.0, 1.0, size=shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def load_feeds(path: str | Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Feeds from an `.npz` keyed by input name, cast to each input's dtype; names checked."""
    path = Path(path)
    try:
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read as .npz: {exc}") from None
    wanted = {spec.name: spec for spec in specs}
    missing = sorted(set(wanted) - set(arrays))
    if missing:
        raise InputError(path, f"missing input(s) {missing}; it holds {sorted(arrays)}")
    return {name: arrays[name].astype(spec.dtype, copy=False) for name, spec in wanted.items()}


def vocab_size(model_path: str | Path) -> int | None:
    """Rows of the embedding table `input_ids` indexes (ONNX), else `vocab_size` in a config.json beside it."""
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        rows = onnx_vocab_size(onnx.load(str(model_path), load_external_data=False))
        if rows is not None:
            return rows
    config = model_path.parent / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("vocab_size")
        return int(value) if isinstance(value, int) else None
    return None


def onnx_vocab_size(model: onnx.ModelProto, ids_name: str = "input_ids") -> int | None:
    """Follow `ids_name` through shape/cast ops to a Gather (or EmbedLayerNormalization) and read its table."""
    graph = model.graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    frontier, seen = [ids_name], set()
    while frontier:
        tensor = frontier.pop()
        seen.add(tensor)
        for node in graph.node:
            if tensor not in node.input:
                continue
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                rows = _table_rows(node.input[0], dims, producers)
                if rows is not None:
                    return rows
            elif node.op_type == "EmbedLayerNormalization" and node.input[0] == tensor:
                rows = _table_rows(node.input[2], dims, producers)
                if rows is not None:
                    return rows
            elif node.op_type in _PASSTHROUGH_OPS and node.input[0] == tensor:
                frontier.extend(out for out in node.output if out not in seen)
    return None


def _table_rows(
    name: str, dims: Mapping[str, list[int]], producers: Mapping[str, onnx.NodeProto]
) -> int | None:
    for _ in range(8):
        if name in dims:
            return dims[name][0] if dims[name] else None
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return int(value.dims[0]) if value is not None and value.dims else None
        if node.op_type not in _TABLE_OPS:
            return None
        name = node.input[0]
    return None
