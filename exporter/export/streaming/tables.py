"""The embedding table and the LM head without holding them in fp32: traced small, streamed in afterwards.

The prefix and suffix pieces hold the model's two largest tensors (vocab x hidden: 1 GiB in fp32 at
Llama-3.2-1B's 128256 x 2048, 2 GiB at 8B); traced with their real weights, TorchScript keeps the
parameter, its constant-folded transpose and the serialized proto at once. Instead, when no mask and no
adapter tensor touches them, the pieces are traced with a `STANDIN_ROWS`-row stand-in at the same module
path (the graph is the same but for that dimension: a Gather on the table, a MatMul on its transpose), and
the stand-in initializer is then pointed at a file holding the real table (or its transpose) converted to
fp32 in chunks from the checkpoint's dtype. The piece is then checked on ONNX Runtime like every piece,
with the real weights, against PyTorch outputs computed from the same checkpoint tensor (row lookups for
the embeddings, chunked matmuls for the logits).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from exporter.model_dir.lazy_weights import LazyTensor

STANDIN_ROWS = 251  # a prime no other dimension of these models has: the one dim to rewrite
CHUNK_VALUES = 32 * 2**20  # values converted to fp32 at a time (128 MiB)


def standin_rows(vocab: int) -> int:
    return STANDIN_ROWS if vocab != STANDIN_ROWS else STANDIN_ROWS + 6


class RowLookup(nn.Module):
    """An embedding read from the checkpoint table as stored (bf16 rows become fp32 exactly)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.table).to(torch.float32)


@torch.no_grad()
def chunked_logits(hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """hidden @ table.T in fp32, converting `table` (vocab x hidden, any float dtype) a block of rows at a time."""
    rows = max(1, CHUNK_VALUES // table.shape[1])
    parts = [hidden @ table[r : r + rows].to(torch.float32).T for r in range(0, table.shape[0], rows)]
    return torch.cat(parts, dim=-1)


def write_fp32(table: torch.Tensor, path: Path, transpose: bool) -> tuple[list[int], int]:
    """`table` (or its transpose) as raw little-endian fp32 at `path`, in chunks; returns (dims, bytes)."""
    vocab, hidden = table.shape
    with open(path, "wb") as out:
        if not transpose:
            rows = max(1, CHUNK_VALUES // hidden)
            for r in range(0, vocab, rows):
                out.write(table[r : r + rows].to(torch.float32).contiguous().numpy().tobytes())
            dims = [vocab, hidden]
        else:
            cols = max(1, CHUNK_VALUES // vocab)
            for c in range(0, hidden, cols):
                out.write(table[:, c : c + cols].T.to(torch.float32).contiguous().numpy().tobytes())
            dims = [hidden, vocab]
    return dims, vocab * hidden * 4


def point_initializer_at(
    piece: Path, standin_dims: list[int], dims: list[int], data: Path, length: int, vocab: int
) -> str:
    """In the piece's ONNX, make the one initializer of `standin_dims` read `data` as fp32 of `dims`, and
    rewrite the stand-in dimension in the graph's inputs and outputs. Returns the initializer's name."""
    model = onnx.load(str(piece), load_external_data=False)
    found = [t for t in model.graph.initializer if list(t.dims) == standin_dims]
    if len(found) != 1:
        raise ValueError(
            f"{piece.name}: expected one stand-in initializer of dims {standin_dims}, found {len(found)}"
        )
    tensor = found[0]
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend(dims)
    tensor.data_type = onnx.TensorProto.FLOAT
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", data.name), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    standin = set(standin_dims) - set(dims)
    for value in [*model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value in standin:
                dim.dim_value = vocab
    onnx.save_model(model, str(piece))
    return tensor.name


def stream_in(
    piece: Path, table: torch.Tensor, data: Path, standin_dims: list[int], vocab: int, transpose: bool
) -> str:
    """Write `table` (or its transpose) as fp32 to `data` and make the piece's stand-in initializer read it
    (`write_fp32` then `point_initializer_at`). Returns the initializer's name."""
    dims, length = write_fp32(table, data, transpose)
    return point_initializer_at(piece, standin_dims, dims, data, length, vocab)


def plain(name: str, lazy: LazyTensor | None, masks: dict, adapter_modules: set[str]) -> bool:
    """Whether the table `name` can be streamed as stored: in the checkpoint, unmasked, no LoRA on it."""
    module = name.rsplit(".", 1)[0]
    return lazy is not None and name not in masks and module not in adapter_modules
