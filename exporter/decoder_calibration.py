"""Calibration feeds for the KV-cache decoder: the token-id samples plus the inputs a prefill needs.

`exporter.calibration.load_calibration` yields `input_ids` / `attention_mask` (tokenized text, a token-id
`.npz`, or random ids). The decoder-with-past graph also takes `position_ids` and one past key/value per
layer; calibrating on prefills means positions from the mask (as generation computes them, via
`positions_from_mask`) and empty pasts of each layer's own shape `[samples, n_kv_i, 0, head_dim]`, read
from the exported graph so per-layer pruned widths need no config. Batching slices the first axis, so
these arrays split into batches like the token ids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx

from exporter.calibration import CalibrationData
from exporter.decoder_export import positions_from_mask
from exporter.errors import InputError


def past_shapes(model_path: Path) -> dict[str, tuple[int, int]]:
    """`past_key_values.*` input -> (KV heads, head size), static in the export."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    shapes = {}
    for tensor in graph.input:
        if tensor.name.startswith("past_key_values."):
            dims = tensor.type.tensor_type.shape.dim
            n_kv, head_dim = dims[1].dim_value, dims[3].dim_value
            if not (n_kv and head_dim):
                raise InputError(model_path, f"{tensor.name}: KV heads and head size must be static")
            shapes[tensor.name] = (n_kv, head_dim)
    return shapes


def prefill_feeds(feeds: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """`feeds` (input_ids, attention_mask) with position_ids and empty pasts added for a prefill."""
    mask = feeds["attention_mask"]
    samples, length = mask.shape
    extra = {"position_ids": positions_from_mask(mask, length)}
    for name, (n_kv, head_dim) in shapes.items():
        extra[name] = np.zeros((samples, n_kv, 0, head_dim), dtype=np.float32)
    return {**feeds, **extra}


def for_decoder(data: CalibrationData, model_path: Path) -> CalibrationData:
    """Calibration and held-out splits extended to the decoder-with-past inputs of `model_path`."""
    shapes = past_shapes(model_path)
    return dataclasses.replace(
        data,
        calibration=prefill_feeds(data.calibration, shapes),
        heldout=prefill_feeds(data.heldout, shapes),
    )
