"""Calibration tensors that hold another tensor's values repeated: fetched and counted once, weighted by copies.

A GQA decoder's attention reads each KV head for several query heads: Hugging Face's `repeat_kv` is Unsqueeze
-> Expand -> Reshape (then, for K, the Transpose to K^T), and the Q/DQ ranges of those MatMul inputs are
measured on the repeated tensors. Their values are the Expand's input, each value `copies` times: ONNX's Expand
broadcasts (an axis of size 1, or a new leading axis, is repeated; any other axis is kept), so every input
value appears numel(output) / numel(input) times, and Reshape, Transpose, (Un)Squeeze, Flatten and Identity
after it move values without changing them or their count. So max |x| of the repeated tensor is its source's
(where it is not empty), and its histogram of |x| is exactly `copies` x the source's, batch by batch: the same
integer counts, the same ranges for every method. The calibration session returns the source and the Expand's
shape (a few int64s: `copies` comes from the batch's actual sizes, whatever the graph's shapes say) instead of
the repeated tensor. The 45M Llama of tools/bench_decoder.py (8 query heads on 2 KV heads: K^T and V hold their
source 4x): 460.6M -> 393.9M values histogrammed, 1.84 -> 1.58 GB kept from SmoothQuant's pass, K^T and V's
histograms 0.46 -> 0.16 s of ~2.4 s; the same files, byte for byte.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

# Ops whose output holds exactly the values of their first input, each once (the default domain only).
PERMUTING = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class Repeat:
    """A tensor made of `source`'s values repeated by an Expand to `shape` (the Expand's two inputs)."""

    source: str
    shape: str


@dataclasses.dataclass(frozen=True)
class Repeated:
    """One batch of a repeated tensor as the ranges read it: `values` (its source's array), each `copies`
    times."""

    values: np.ndarray
    copies: int

    @classmethod
    def of(cls, values: np.ndarray, shape: np.ndarray) -> Repeated:
        """The Expand of `values` to `shape` (numpy's broadcasting is ONNX Expand's), without computing it."""
        size = math.prod(np.broadcast_shapes(values.shape, tuple(int(d) for d in shape)))
        return cls(values, size // values.size if values.size else 0)


Values = np.ndarray | Repeated


def find_repeats(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, Repeat]:
    """Those of `names` whose values are an Expand's input repeated: the Expand, then only `PERMUTING` ops."""
    producers = {output: node for node in model.graph.node for output in node.output}
    found = {}
    for name in names:
        node = producers.get(name)
        while node is not None and node.op_type in PERMUTING and node.domain in DEFAULT_DOMAINS:
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "Expand" and node.domain in DEFAULT_DOMAINS:
            found[name] = Repeat(node.input[0], node.input[1])
    return found


@dataclasses.dataclass(frozen=True)
class Fetch:
    """What a calibration session returns for `names`: each tensor itself, or for one of `repeats` its source
    and the Expand's shape (a source shared by several tensors, or also asked for itself, is fetched once)."""

    names: Sequence[str]
    repeats: Mapping[str, Repeat] = dataclasses.field(default_factory=dict)

    @classmethod
    def plan(cls, model: onnx.ModelProto, names: Sequence[str], direct: Iterable[str] = ()) -> Fetch:
        """`names`, repeated ones through their source except `direct` (whose arrays are read per channel)."""
        names = list(dict.fromkeys(names))
        skip = set(direct)
        return cls(names, find_repeats(model, [n for n in names if n not in skip]))

    @property
    def outputs(self) -> list[str]:
        """The session's outputs, in order, once each."""
        wanted = [[r.source, r.shape] if (r := self.repeats.get(n)) else [n] for n in self.names]
        return list(dict.fromkeys(name for group in wanted for name in group))

    def batch(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Values]:
        """One batch's values per name, from the session's `arrays` (by output name)."""
        return {
            n: Repeated.of(arrays[r.source], arrays[r.shape]) if (r := self.repeats.get(n)) else arrays[n]
            for n in self.names
        }
