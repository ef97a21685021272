"""Activation-aware weight-only quantization (AWQ-style), per weight or per group of weights sharing an input.

Weight-only INT4 errs most where the weight meets large activations: a block's scale is set by its largest
weight, and a column of W that reads an outlier channel of x (the pattern of trained LLMs: a few channels
10-100x larger after every RMSNorm) is often tiny, so rounding wipes it out while x multiplies its error.
AWQ (Lin et al., 2023) scales input channel k of W up by s_k before quantizing and divides x by s_k:
x @ W = (x / s) @ (s·W), so the product is unchanged in fp32 while the salient channels get more of the
block's levels. s = mean|x|^alpha (normalised by sqrt(max·min)); alpha in [0, 1] is chosen per group by the
output error on calibration rows, with the weights actually quantized (alpha = 0 is round-to-nearest, so the
search never does worse than RTN on its own sample). Weights that read the same x (q/k/v; gate/up) share s,
because 1/s is folded into the op producing x (the RMSNorm gain, or the up projection's columns for down).

ONNX Runtime's MatMulNBits at accuracy_level 4 also rounds x: to int8 per row and block of K (scale max|x|/127)
before its int8 dot products. With `activation_block` set, every error here is measured with x so rounded
(and x / s rounded after scaling), so the search optimises what the CPU kernel computes: the input scale
then also evens out the activation blocks (what SmoothQuant does for INT8).

Then clipping: per (output column, block), the block's range is shrunk by the ratio in `CLIP_RATIOS` that
minimises that block's output error on the same rows. Clipping is applied to the weight before the plain
block quantizer (exporter/quantize/blocks.py), so the packing stays bit-exact with ONNX Runtime's.

`quantize_weight` is the per-weight entry point (numpy in, `BlockQuantized` out): the whole-graph pass
(exporter/quantize/int4.py) and a layer-by-layer streaming export call it the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from exporter.quantize.blocks import BlockQuantized, check_block_size, dequantize_blocks, quantize_blocks

Method = Literal["rtn", "awq"]
METHODS: tuple[str, ...] = ("rtn", "awq")
ALPHA_GRID = np.linspace(0.0, 1.0, 11)
# Clip search only at 4 bits. Measured (a [512, 1408] weight with a few 8x entries, rows with 30x outlier
# channels, block 32, x rounded as accuracy_level 4 does): at 4 bits clipping cuts the output error 3.3x
# (7.6e-3 -> 2.3e-3, mean ratio 0.95); at 8 bits 5% (1.69e-4 -> 1.60e-4, ratio 0.997), an error already 14x
# below the clipped 4-bit one, for the same search time (~0.35 s per weight). The INT4 stage quantizes every
# candidate at both widths for its mixed-precision search, so this halves its clip searches.
CLIPPED_BITS = (4,)
CLIP_RATIOS = np.linspace(1.0, 0.7, 7)
MAX_ROWS = 512  # calibration rows the searches use per input tensor


@dataclasses.dataclass
class WeightReport:
    """What happened to one weight: for the export report."""

    method: str
    bits: int
    block_size: int
    alpha: float | None = None  # AWQ exponent of the shared input scale (None: no input scale)
    input_scale: dict[str, float] | None = None  # min / max / mean of s
    clip_ratio_mean: float | None = None
    error_rtn: float | None = None  # relative output error ||x(W - W_q)||² / ||xW||² with plain RTN
    error: float | None = None  # the same for the chosen method

    def error_or_zero(self) -> float:
        return self.error or 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def output_error(
    x: np.ndarray, weight: np.ndarray, approx: np.ndarray, x_approx: np.ndarray | None = None
) -> float:
    """Relative squared output error of computing x_approx @ approx (default x @ approx) for x @ weight."""
    reference = x @ weight
    denom = float(np.sum(reference.astype(np.float64) ** 2)) or 1.0
    got = (x if x_approx is None else x_approx) @ approx
    return float(np.sum((reference - got).astype(np.float64) ** 2)) / denom


def round_activations(x: np.ndarray, block_size: int | None) -> np.ndarray:
    """x as MatMulNBits' int8 path sees it: per row and block of K, symmetric int8 with scale max|x| / 127."""
    if not block_size:
        return x
    m, k = x.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((m, k_blocks * block_size), np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(m, k_blocks, block_size)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    rounded = np.clip(np.round(blocks / safe), -127, 127) * scale
    return rounded.reshape(m, -1)[:, :k].astype(np.float32)


def rtn_dequantized(weight: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    return dequantize_blocks(quantize_blocks(weight, bits, block_size))


def input_scale(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = mean|x|^alpha / sqrt(max·min) (AWQ's normalisation), float32, never 0."""
    s = np.maximum(mean_abs.astype(np.float64), 1e-8) ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.maximum(s, 1e-4).astype(np.float32)


def search_input_scale(
    weights: Sequence[np.ndarray],
    x: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    activation_block: int | None = None,
) -> tuple[np.ndarray, float, float]:
    """(s, alpha, error) minimising the summed output error of `weights` (all [K, *]) reading rows `x` [M, K]
    when quantized as s·W with x / s (rounded per `activation_block` when set). alpha = 0 (s = 1) is RTN."""
    x = _rows(x)
    mean_abs = np.abs(x).mean(axis=0)
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in ALPHA_GRID:
        s = input_scale(mean_abs, float(alpha))
        xs = x / s
        xs_hat = round_activations(xs, activation_block)
        error = 0.0
        for w in weights:
            scaled = w * s[:, None]
            error += output_error(xs, scaled, rtn_dequantized(scaled, bits, block_size), xs_hat)
        if best is None or error < best[0] - 1e-12:
            best = (error, float(alpha), s)
    assert best is not None
    return best[2], best[1], best[0]


def clip_weight(
    weight: np.ndarray, x: np.ndarray, bits: int = 4, block_size: int = 32
) -> tuple[np.ndarray, float]:
    """W with each (column, block) clipped to the ratio of its max |w| that minimises the block's output
    error on rows `x`; and the mean ratio chosen."""
    k, n = weight.shape
    k_blocks = -(-k // block_size)
    pad = k_blocks * block_size - k
    w = np.pad(weight, ((0, pad), (0, 0))).reshape(k_blocks, block_size, n)
    xb = np.pad(x, ((0, 0), (0, pad))).reshape(x.shape[0], k_blocks, block_size)
    amax = np.abs(w).max(axis=1, keepdims=True)  # [k_blocks, 1, n]
    best_error = np.full((k_blocks, n), np.inf)
    best_ratio = np.ones((k_blocks, n), np.float32)
    # Block b's error on column j is sum_m (x_b[m]·d_b[:, j])^2 = d_b[:, j]ᵀ G_b d_b[:, j], G_b = x_bᵀ x_b: one
    # [block, block] Gram matrix per block, computed once for every ratio (M / block_size times fewer flops
    # than multiplying the rows again; the INT4 stage spent most of its weight time here).
    gram = np.einsum("mkb,mkc->kbc", xb, xb, dtype=np.float64).astype(np.float32)  # [k_blocks, bs, bs]
    for ratio in CLIP_RATIOS:
        limit = amax * np.float32(ratio)
        clipped = np.clip(w, -limit, limit).reshape(-1, n)[:k]
        diff = np.pad(weight - rtn_dequantized(clipped, bits, block_size), ((0, pad), (0, 0)))
        diff = diff.reshape(k_blocks, block_size, n)
        error = np.einsum("kbn,kbn->kn", np.matmul(gram, diff), diff)  # per (block, column)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_ratio = np.where(better, np.float32(ratio), best_ratio)
    limit = amax * best_ratio[:, None, :]
    clipped = np.clip(w, -limit, limit).reshape(-1, n)[:k]
    return clipped.astype(np.float32), float(best_ratio.mean())


def quantize_weight(
    weight: np.ndarray,
    *,
    bits: int = 4,
    block_size: int = 32,
    method: Method = "awq",
    activations: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    alpha: float | None = None,
    activation_block: int | None = None,
) -> tuple[BlockQuantized, WeightReport]:
    """Quantize one weight W [K, N] of `x @ W`.

    `activations`: rows of x [M, K] from calibration (AWQ needs them; without, AWQ degrades to RTN).
    `scale`: the input scale s [K] shared with the other weights reading the same x (from
    `search_input_scale`): the result stores s·W and `input_scale` = s, and the caller folds 1/s into the op
    producing x. RTN ignores both and returns ONNX Runtime's own quantization of W. `activation_block`: errors
    measured with x rounded as MatMulNBits' accuracy_level 4 rounds it (None: exact x).
    """
    check_block_size(block_size, bits)
    weight = np.asarray(weight, np.float32)
    report = WeightReport(method, bits, block_size)
    x = None if activations is None else _rows(activations)
    if method == "rtn" or x is None:
        quantized = quantize_blocks(weight, bits, block_size)
        quantized.rounded_from = weight
        if x is not None:
            x_hat = round_activations(x, activation_block)
            report.error_rtn = report.error = output_error(x, weight, dequantize_blocks(quantized), x_hat)
        report.method = "rtn"
        return quantized, report
    if method != "awq":
        raise ValueError(f"unknown weight-only method {method!r}; choose from {METHODS}")
    rtn = rtn_dequantized(weight, bits, block_size)
    report.error_rtn = output_error(x, weight, rtn, round_activations(x, activation_block))
    scaled, xs = weight, x
    if scale is not None:
        scaled, xs = weight * scale[:, None], x / scale
        report.alpha = alpha
        report.input_scale = {
            "min": float(scale.min()),
            "max": float(scale.max()),
            "mean": float(scale.mean()),
        }
    xs_hat = round_activations(xs, activation_block)
    if bits in CLIPPED_BITS:
        clipped, report.clip_ratio_mean = clip_weight(scaled, xs_hat, bits, block_size)
    else:  # 8 bits: clipping wins ~5% of an already small error (CLIPPED_BITS)
        clipped, report.clip_ratio_mean = scaled, 1.0
    quantized = quantize_blocks(clipped, bits, block_size)
    quantized.input_scale, quantized.rounded_from = scale, clipped
    # x @ W = (x / s) @ (s·W): the error of the stored weight on the scaled rows is the layer's error
    report.error = output_error(xs, scaled, dequantize_blocks(quantized), xs_hat)
    return quantized, report


def _rows(x: np.ndarray, limit: int = MAX_ROWS) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
    if len(x) > limit:
        x = x[np.linspace(0, len(x) - 1, limit).astype(np.int64)]
    return x
