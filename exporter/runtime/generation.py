"""Text generation on an exported decoder-with-past: prefill once, then one token per step with the cache.

Works on an `onnxruntime.InferenceSession` or on any active `engines.base.Runner` (`infer(feeds)`,
`input_specs`). The KV head count and head size of every layer's past are read from the model's
own input shapes (static in the export), so a model pruned to different widths per layer needs no
config: the empty past of the prefill is built to each layer's shape, and a layer whose attention the
restructure removed simply has no past input (the cache is whatever `past_key_values.*` the model has).

Greedy decoding picks the first maximum (as torch.argmax does), so on equal logits the tokens
match PyTorch's `generate(do_sample=False)`. Sampling draws from a numpy Generator seeded by `seed`:
the same seed gives the same tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from export_errors import InputError
from exporter.export.decoder_with_past import positions_from_mask

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_ORT_FLOATS = {"tensor(float16)": np.dtype(np.float16)}  # numpy dtype of a float past; float32 otherwise


class _Step:
    """Adapter: `run(feeds) -> {name: array}` and the input shapes, for a session or a runner."""

    def __init__(self, session_or_runner: Any) -> None:
        self._target = session_or_runner
        if hasattr(session_or_runner, "infer"):
            specs = session_or_runner.input_specs
            self.input_shapes = {s.name: tuple(s.shape) for s in specs}
            self.input_dtypes = {s.name: np.dtype(s.dtype) for s in specs}
        elif hasattr(session_or_runner, "get_inputs"):
            inputs = session_or_runner.get_inputs()
            self.input_shapes = {i.name: tuple(i.shape) for i in inputs}
            self.input_dtypes = {i.name: _ORT_FLOATS.get(i.type, np.dtype(np.float32)) for i in inputs}
            self._outputs = [o.name for o in session_or_runner.get_outputs()]
        else:
            raise InputError(
                "generate", f"expected an onnxruntime session or a Runner, got {type(session_or_runner)}"
            )

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if hasattr(self._target, "infer"):
            return self._target.infer(feeds)
        return dict(zip(self._outputs, self._target.run(self._outputs, dict(feeds))))


class CachedDecoder:
    """The KV cache of one generation, carried between calls of the exported decoder.

    `forward(new_ids)` appends `new_ids` (batch x new tokens) to the sequence and returns their
    logits; the first call with an empty cache is the prefill.

    `prefill`: a second file of the same decoder (e.g. `model.int8.cpu.onnx`, whose dynamic INT8 kernels
    are fastest on a whole prompt) that runs the calls with an empty cache, while `session_or_runner`
    (e.g. `model.int4.cpu.onnx`, fastest per token) runs every later step. Both read and write the same
    cache: the same `past_key_values.*` inputs with the same KV heads, head sizes and dtypes (checked
    here, else InputError), and the cache one writes is what the other would have written for its own
    weights, so each call is exactly that file's own computation on the cache it is given.
    """

    def __init__(self, session_or_runner: Any, prefill: Any = None) -> None:
        self._step = _Step(session_or_runner)
        self._past_specs = self._read_past_specs()
        self._prefill = None
        if prefill is not None:
            self._prefill = _Step(prefill)
            theirs = {
                n: (s[1], s[3], self._prefill.input_dtypes[n])
                for n, s in self._prefill.input_shapes.items()
                if _PAST.match(n)
            }
            for name in sorted(set(theirs) | set(self._past_specs)):
                if theirs.get(name) != self._past_specs.get(name):
                    raise InputError(
                        name,
                        f"prefill file has (KV heads, head size, dtype) {theirs.get(name)}, the decode file "
                        f"{self._past_specs.get(name)}: a prefill/decode pair must share one cache layout",
                    )
        self.attention_mask: np.ndarray | None = None
        self._past: dict[str, np.ndarray] = {}

    def _read_past_specs(self) -> dict[str, tuple[int, int, np.dtype]]:
        specs: dict[str, tuple[int, int, np.dtype]] = {}
        for name, shape in self._step.input_shapes.items():
            if _PAST.match(name):
                n_kv, head_dim = shape[1], shape[3]
                if not (isinstance(n_kv, int) and isinstance(head_dim, int)):
                    raise InputError(name, f"past shape {shape} needs static KV heads and head size")
                specs[name] = (n_kv, head_dim, self._step.input_dtypes[name])
        if not specs or "input_ids" not in self._step.input_shapes:
            raise InputError(
                "generate", "the model has no past_key_values.* inputs: export it with the KV cache"
            )
        return specs

    def reset(self, batch: int, attention_mask: np.ndarray | None = None) -> None:
        """Empty the cache; `attention_mask` (batch x prompt) marks left padding of the coming prompt."""
        self._past = {
            name: np.zeros((batch, n_kv, 0, head_dim), dtype=dtype)
            for name, (n_kv, head_dim, dtype) in self._past_specs.items()
        }
        self.attention_mask = None if attention_mask is None else attention_mask.astype(np.int64)

    def forward(self, new_ids: np.ndarray) -> np.ndarray:
        if not self._past:
            raise RuntimeError("CachedDecoder.forward before reset(batch): the cache has no batch size yet")
        batch, new = new_ids.shape
        past_length = next(iter(self._past.values())).shape[2]
        mask = self.attention_mask
        if mask is None or mask.shape[1] == past_length:
            grown = np.ones((batch, new), dtype=np.int64)
            mask = grown if mask is None else np.concatenate([mask, grown], axis=1)
        if mask.shape != (batch, past_length + new):
            raise InputError("attention_mask", f"shape {mask.shape}, expected {(batch, past_length + new)}")
        self.attention_mask = mask
        feeds = {
            "input_ids": new_ids.astype(np.int64),
            "attention_mask": mask,
            "position_ids": positions_from_mask(mask, new),
            **self._past,
        }
        step = self._prefill if self._prefill is not None and past_length == 0 else self._step
        outputs = step.run(feeds)
        self._past = {name: outputs[name.replace("past_key_values", "present")] for name in self._past}
        return outputs["logits"]


def generate(
    session_or_runner: Any,
    input_ids: np.ndarray,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    attention_mask: np.ndarray | None = None,
    prefill: Any = None,
) -> np.ndarray:
    """Prompt + generated tokens (batch x (prompt + n)), n <= max_new_tokens; stops when every row has
    produced `eos_token_id`, rows that finished earlier are filled with it (as HF generate pads).
    `prefill`: another file of the same decoder that runs the prompt (see `CachedDecoder`)."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise InputError("input_ids", f"expected batch x prompt (prompt >= 1), got shape {input_ids.shape}")
    if do_sample and temperature <= 0:
        raise InputError("temperature", f"must be > 0 when sampling, got {temperature}")
    decoder = CachedDecoder(session_or_runner, prefill)
    decoder.reset(input_ids.shape[0], attention_mask)
    rng = np.random.default_rng(seed)
    finished = np.zeros(input_ids.shape[0], dtype=bool)
    tokens = [input_ids]
    new_ids = input_ids
    for _ in range(max_new_tokens):
        logits = decoder.forward(new_ids)[:, -1, :]
        nxt = sample(logits, rng, temperature, top_k) if do_sample else logits.argmax(axis=-1)
        if eos_token_id is not None:
            nxt = np.where(finished, eos_token_id, nxt)
            finished |= nxt == eos_token_id
        new_ids = nxt[:, None].astype(np.int64)
        tokens.append(new_ids)
        if finished.all():
            break
    return np.concatenate(tokens, axis=1)


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int | None) -> np.ndarray:
    """One token per row from softmax(logits / temperature), restricted to the top_k logits if given."""
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def greedy_agreement(
    reference: Any,
    candidate: Any,
    prompts: list[np.ndarray],
    *,
    max_new_tokens: int = 16,
    reference_runs: dict[bytes, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float | int]:
    """How closely `candidate` (e.g. an INT8 decoder) follows `reference` (its fp32 model) in generation.

    For each prompt (1-D token ids, run at batch 1 so no padding is involved) the reference generates
    greedily; both models then score that same sequence in one prefill, and at every new-token position
    we compare: `greedy_agreement` is the fraction where the candidate's argmax is the reference's token
    (teacher-forced, so one early miss does not count against every later step), `logit_mean_cosine` /
    `logit_min_cosine` the cosine of the two logit vectors. Free-running generation is also reported:
    `free_running_agreement` (same token at the same step when each model generates on its own) and
    `mean_identical_prefix` (new tokens before the first difference).

    `candidate` may be a prefill/decode pair `(decode, prefill)` (see `CachedDecoder`): it generates as the
    pair does, and is teacher-forced as it would run, the prompt on `prefill`, then one token per step on
    `decode` (a pair's one-call scoring would judge the prefill file alone).
    `reference_runs`: the reference's generation and scores per prompt, filled on first use and read after
    (one fp32 model judged against several candidates computes them once: the same numbers).
    """
    decode, prefill = candidate if isinstance(candidate, tuple) else (candidate, None)
    hits, free_hits, cosines, prefixes, steps = 0, 0, [], [], 0
    for prompt in prompts:
        ids = np.asarray(prompt, dtype=np.int64)[None, :]
        key = ids.tobytes() + max_new_tokens.to_bytes(4, "little")
        if reference_runs is None or key not in reference_runs:
            ref_tokens = generate(reference, ids, max_new_tokens=max_new_tokens)
            ref_scores = _scored(reference, ref_tokens[:, :-1])[0, ids.shape[1] - 1 :]
            if reference_runs is not None:
                reference_runs[key] = (ref_tokens, ref_scores)
        else:
            ref_tokens, ref_scores = reference_runs[key]
        cand_tokens = generate(decode, ids, max_new_tokens=max_new_tokens, prefill=prefill)
        new_ref = ref_tokens[0, ids.shape[1] :]
        new_cand = cand_tokens[0, ids.shape[1] :]
        same = new_ref == new_cand[: len(new_ref)]
        free_hits += int(same.sum())
        prefixes.append(int(np.argmin(same)) if not same.all() else len(same))
        ref_logits = ref_scores
        if prefill is None:
            cand_logits = _scored(decode, ref_tokens[:, :-1])[0, ids.shape[1] - 1 :]
        else:
            cand_logits = _scored_in_steps(decode, prefill, ref_tokens[:, :-1], ids.shape[1])[0]
        hits += int((cand_logits.argmax(axis=-1) == new_ref).sum())
        cosines.append(_row_cosines(ref_logits, cand_logits))
        steps += len(new_ref)
    cosine = np.concatenate(cosines)
    return {
        "prompts": len(prompts),
        "new_tokens": steps,
        "greedy_agreement": hits / steps,
        "free_running_agreement": free_hits / steps,
        "mean_identical_prefix": float(np.mean(prefixes)),
        "logit_mean_cosine": float(cosine.mean()),
        "logit_min_cosine": float(cosine.min()),
    }


def _scored(session_or_runner: Any, tokens: np.ndarray) -> np.ndarray:
    """Logits of every position of `tokens` from one prefill with an empty cache."""
    decoder = CachedDecoder(session_or_runner)
    decoder.reset(tokens.shape[0])
    return decoder.forward(tokens)


def _scored_in_steps(decode: Any, prefill: Any, tokens: np.ndarray, prompt: int) -> np.ndarray:
    """Logits of the last prompt position and of every later position of `tokens`, as a pair generates:
    the prompt in one call on `prefill`, then one token per call on `decode` with the cache."""
    decoder = CachedDecoder(decode, prefill)
    decoder.reset(tokens.shape[0])
    logits = [decoder.forward(tokens[:, :prompt])[:, -1:]]
    logits += [decoder.forward(tokens[:, t : t + 1]) for t in range(prompt, tokens.shape[1])]
    return np.concatenate(logits, axis=1)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.maximum(norms, 1e-30)
