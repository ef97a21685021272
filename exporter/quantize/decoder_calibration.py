"""Calibration feeds for the KV-cache decoder: prefills, and the decode steps that follow them.

`exporter.quantize.calibration.load_calibration` yields `input_ids` / `attention_mask` (tokenized text, a token-id
`.npz`, or random ids). The decoder-with-past graph also takes `position_ids` and one past key/value per
layer. A prefill gets positions from the mask (as generation computes them, via `positions_from_mask`)
and empty pasts of each layer's own shape `[samples, n_kv_i, 0, head_dim]`, read from the exported graph so
per-layer pruned widths need no config.

At generation time most calls are decode steps: one new token against a non-empty past. `for_decoder(...,
decode_steps=K)` calibrates on those too. Each sample is split into a prefill and K decode steps:
- teacher forcing (a sample with more than 2K real tokens): its last K real tokens are held back from the
  prefill (masked, ids set to the padding id) and fed one per step afterwards, so every token of the
  sample is seen once, in the mode generation would see it;
- greedy (a shorter sample): the whole sample is the prefill, and the fp32 model's own argmax tokens follow.
The fp32 graph runs the prefill and each step (ONNX Runtime), its presents become the next step's pasts,
and step j's feeds (`input_ids [samples, 1]`, pasts `[samples, n_kv_i, L + j, head_dim]`, the mask grown by
one per step, positions continuing from the prefill) are one extra feed group of `CalibrationData`, which
the range collector batches like the prefill (the steps' pasts are views of one array per layer, so
memory is one past of L + K - 1 positions per layer and sample). Masked past slots (padding, held-back tokens) are exactly
ignored by attention, so a teacher-forced step computes what a prefill of the sample would at that position.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export_errors import InputError
from exporter.export.decoder_with_past import positions_from_mask
from exporter.quantize.calibration import CalibrationData

# Decode steps appended to every calibration sample by default: 0 (prefills only), by measurement
# (tools/bench_decoder_calibration.py --prompts 32, model.int8.onnx vs fp32 over 512 generated tokens):
# 4 steps changed nothing beyond seed-to-seed noise and cost time and memory. llama-512 (8 layers, GQA 8:2),
# English-token .npz, seed 0 / 1: logit cosine 0.99869 -> 0.99868 / 0.99868 -> 0.99868, teacher-forced
# agreement 0.863 -> 0.834 / 0.838 -> 0.848 (prefill-only itself moves 0.025 between seeds); feed
# construction 12-35 s; random ids: 0.99869 -> 0.99867; planted outlier channels: 0.99394 -> 0.99321; tiny
# pruned Llama/Qwen2 (3 seeds): cosine equal to 4 digits, agreement within +-0.02. Teacher-forced steps
# recompute values the prefill already covers (same token at the same position), so ranges barely move.
# `--calibration-decode-steps K` turns them on (the held-out gate then also judges decode steps).
DECODE_STEPS = 0
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
# A decode step is one token per sample: run (and calibrate) this many times the prefill batch per call,
# so per-call overhead does not dominate.
STEP_BATCH_FACTOR = 16


def past_shapes(model_path: Path, graph: onnx.GraphProto | None = None) -> dict[str, tuple[int, int]]:
    """`past_key_values.*` input -> (KV heads, head size), static in the export. `graph`: the file's graph
    already in memory (the INT8 stage just wrote it; reading 221 MB back for the input shapes took 0.2 s)."""
    graph = graph if graph is not None else onnx.load(str(model_path), load_external_data=False).graph
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


def for_decoder(
    data: CalibrationData,
    model_path: Path,
    decode_steps: int = DECODE_STEPS,
    graph: onnx.GraphProto | None = None,
) -> CalibrationData:
    """Calibration and held-out splits extended to the decoder-with-past inputs of `model_path`: prefills,
    plus `decode_steps` decode-step feed groups per split (computed by running the fp32 `model_path`).
    `graph`: `model_path`'s graph when it is in memory (`past_shapes`)."""
    shapes = past_shapes(model_path, graph)
    if decode_steps <= 0:
        return dataclasses.replace(
            data,
            calibration=prefill_feeds(data.calibration, shapes),
            heldout=prefill_feeds(data.heldout, shapes),
        )
    session = _session(model_path)
    pad_id = padding_id(data.calibration)
    splits = {
        split: with_decode_steps(session, feeds, shapes, decode_steps, data.batch, pad_id)
        for split, feeds in (("calibration", data.calibration), ("heldout", data.heldout))
    }
    return dataclasses.replace(
        data,
        calibration=splits["calibration"][0],
        heldout=splits["heldout"][0],
        groups={split: steps for split, (_, steps) in splits.items()},
        group_batch=data.batch * STEP_BATCH_FACTOR,
    )


def with_decode_steps(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    shapes: dict[str, tuple[int, int]],
    steps: int,
    batch: int,
    pad_id: int = 0,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """(prefill feeds, one feed dict per decode step) for all samples of `feeds`: prefills run `batch`
    samples at a time, decode steps `batch * STEP_BATCH_FACTOR`."""
    ids, mask, forced = hold_back(feeds["input_ids"], feeds["attention_mask"], steps, pad_id)
    prefill = prefill_feeds({**feeds, "input_ids": ids, "attention_mask": mask}, shapes)
    past, logits = run_prefills(session, prefill, batch)
    size = batch * STEP_BATCH_FACTOR
    chunks = [
        decode_steps_after(
            session,
            mask[start : start + size],
            {name: array[start : start + size] for name, array in past.items()},
            logits[start : start + size],
            forced[start : start + size],
        )
        for start in range(0, len(ids), size)
    ]
    del past
    # Step j's past is the first L + j positions of the last step's past (presents append): one array per
    # layer holds every step's past, the groups hold views of it (K times less memory than copies).
    last = {name: np.concatenate([c[-1][name] for c in chunks]) for name in shapes}
    groups = []
    for step in range(steps):
        group = {name: np.concatenate([c[step][name] for c in chunks]) for name in STEP_INPUTS}
        length = group["attention_mask"].shape[1] - 1
        groups.append({**group, **{name: array[:, :, :length] for name, array in last.items()}})
    return prefill, groups


def run_prefills(
    session: ort.InferenceSession, prefill: dict[str, np.ndarray], batch: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(presents as `past_key_values.*` [samples, n_kv, L, head_dim], logits at each sample's last real
    token [samples, vocab]) of the fp32 prefills, `batch` samples at a time."""
    mask = prefill["attention_mask"]
    last_real = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    pasts, logits = [], []
    for start in range(0, len(mask), batch):
        outputs = _run(session, {name: array[start : start + batch] for name, array in prefill.items()})
        rows = np.arange(len(outputs["logits"]))
        logits.append(outputs["logits"][rows, last_real[start : start + batch]])
        pasts.append({n: a for n, a in outputs.items() if n.startswith("present.")})
    past = {
        name.replace("present", "past_key_values"): np.concatenate([p[name] for p in pasts])
        for name in pasts[0]
    }
    return past, np.concatenate(logits)


def hold_back(
    input_ids: np.ndarray, attention_mask: np.ndarray, steps: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prefill ids, prefill mask, forced tokens [samples, steps]): a sample with more than 2 * `steps` real
    tokens loses its last `steps` real tokens to the decode steps (teacher forcing); a shorter one keeps all
    and is continued greedily (forced tokens -1)."""
    ids, mask = input_ids.copy(), attention_mask.copy()
    forced = np.full((len(ids), steps), -1, dtype=np.int64)
    for row in range(len(ids)):
        real = np.flatnonzero(mask[row])
        if len(real) > 2 * steps:
            held = real[-steps:]
            forced[row] = ids[row, held]
            ids[row, held], mask[row, held] = pad_id, 0
    return ids, mask, forced


def decode_steps_after(
    session: ort.InferenceSession,
    mask: np.ndarray,
    past: dict[str, np.ndarray],
    logits: np.ndarray,
    forced: np.ndarray,
) -> list[dict[str, np.ndarray]]:
    """One decode step per column of `forced` (a token id, or -1: the argmax of the previous `logits`) after
    a prefill with `mask` and presents `past`, each step's presents feeding the next; each step's feeds."""
    steps = []
    for column in forced.T:
        token = np.where(column >= 0, column, logits.argmax(axis=-1))[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        steps.append({**dict(zip(STEP_INPUTS, (token, mask, positions_from_mask(mask, 1)))), **past})
        outputs = _run(session, steps[-1])
        logits = outputs["logits"][:, -1]
        past = {name: outputs[name.replace("past_key_values", "present")] for name in past}
    for step in steps[:-1]:  # the last past holds every earlier one as a prefix: keep views, free copies
        length = step["attention_mask"].shape[1] - 1
        step.update({name: steps[-1][name][:, :, :length] for name in past})
    return steps


def padding_id(feeds: dict[str, np.ndarray]) -> int:
    """The id found at masked positions (the tokenizer's padding), 0 if the samples have no padding."""
    padded = feeds["input_ids"][feeds["attention_mask"] == 0]
    return int(np.bincount(padded).argmax()) if padded.size else 0


def _session(model_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
