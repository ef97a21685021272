"""Tiny seeded ONNX encoders for the engine-bench and stage-report tests (built in code, no files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = 50
HIDDEN = 8
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def tiny_tables(vocab: int = VOCAB, hidden: int = HIDDEN, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded word (vocab x hidden) and token-type (2 x hidden) embedding tables."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((vocab, hidden)).astype(np.float32), rng.standard_normal((2, hidden)).astype(
        np.float32
    )


def tiny_encoder(
    vocab: int = VOCAB, hidden: int = HIDDEN, seed: int = 0, quantized_table: bool = False
) -> onnx.ModelProto:
    """(input_ids, attention_mask, token_type_ids) -> last_hidden_state = (E[ids] + T[types]) * mask.

    `input_ids` reaches its Gather through a Cast (as exported graphs often do); with `quantized_table`
    the word table is an int8 initializer behind a DequantizeLinear, as in a Q/DQ INT8 graph.
    """
    words, types = tiny_tables(vocab, hidden, seed)
    inits = [
        numpy_helper.from_array(types, "type_table"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32)]
    if quantized_table:
        inits += [
            numpy_helper.from_array(np.clip(np.round(words * 40), -127, 127).astype(np.int8), "word_q"),
            numpy_helper.from_array(np.array(1 / 40, np.float32), "word_scale"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["word_q", "word_scale"], ["word_table"]))
    else:
        inits.append(numpy_helper.from_array(words, "word_table"))
    nodes += [
        helper.make_node("Gather", ["word_table", "ids32"], ["w"]),
        helper.make_node("Gather", ["type_table", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["w", "t"], ["wt"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["wt", "mask3"], ["last_hidden_state"]),
    ]
    dims = ["batch", "sequence"]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, dims)
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, hidden])
    graph = helper.make_graph(nodes, "tiny_encoder", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_tiny_encoder(path: Path, **kwargs: object) -> Path:
    onnx.save(tiny_encoder(**kwargs), str(path))  # type: ignore[arg-type]
    return path


def tiny_torch_encoder(vocab: int = VOCAB, hidden: int = HIDDEN, seed: int = 0):  # type: ignore[no-untyped-def]
    """The PyTorch twin of `tiny_encoder` (same tables): the reference stage of the stage-report tests."""
    import torch
    from torch import nn

    words, types = tiny_tables(vocab, hidden, seed)

    class TinyEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words = nn.Embedding.from_pretrained(torch.from_numpy(words))
            self.types = nn.Embedding.from_pretrained(torch.from_numpy(types))

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            hidden = self.words(input_ids) + self.types(token_type_ids)
            return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)

    return TinyEncoder().eval()
