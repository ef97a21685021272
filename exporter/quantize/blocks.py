"""Block-wise weight-only quantization as small pure functions: numpy in, packed weights and scales out.

One weight W [K, N] of `y = x @ W` (K = input channels, N = output channels) is cut along K into blocks of
`block_size`; every (output column, block) pair gets one scale. Symmetric, as ONNX Runtime's MLAS quantizes
it (`quantize_matmul_4bits` / `quantize_matmul_8bits`, the kernels behind onnxruntime's
`matmul_nbits_quantizer.py`), reproduced bit for bit (tests/test_int4_blocks.py):

    scale = v / -2^(bits-1)       v: the block's value of largest magnitude, sign kept (so v maps to q = 0)
    q     = clip(floor(w * (1/scale) + 2^(bits-1) + 0.5), 0, 2^bits - 1)      (float32 arithmetic)
    w'    = (q - 2^(bits-1)) * scale                                            (MatMulNBits' dequantization)

An all-zero block has scale 0 and q = 2^(bits-1). When K is not a multiple of the block (pruned widths are
arbitrary), the last block is padded with 0 bytes, as ONNX Runtime writes them, and never read (MatMulNBits
takes the true K). With an odd K the high nibble of the last real byte is padding too: ONNX Runtime leaves
whatever its kernel computed there (seen: 0, or stray codes at block 128); ours is 0.

Layouts:
- `com.microsoft.MatMulNBits` (ONNX Runtime CPU): B uint8 [N, k_blocks, block_size·bits/8], two 4-bit values
  per byte, low nibble first; scales float [N, k_blocks] (flattened); no zero points (the default 2^(bits-1)
  is the symmetric one).
- ONNX `DequantizeLinear` opset 21 with `block_size`, axis 0: signed int4 values q - 8 in [K, N], scales
  [k_blocks, N], zero point 0 (`signed_blocks`): the same numbers as MatMulNBits, on ONNX Runtime.
- TensorRT (`tensorrt_blocks`): TensorRT requires positive scales, and the MLAS scale above is negative
  whenever the block's largest value is positive (its code 0 = -8 cannot be negated into int4). So the
  TensorRT file rounds the same pre-rounding weight (same AWQ scales, same clipping) on the symmetric grid
  scale = max|w| / (2^(bits-1) - 1) > 0, values in [-7, 7] (or [-127, 127]), scales rounded to float16
  values first so the fp16 engine reads exactly what the file says.

Where x's channels are scaled before quantization (AWQ-style: W·diag-by-row s, x / s), the caller folds
1/s into the op producing x; `BlockQuantized.input_scale` carries s so nobody forgets (exporter/quantize/awq.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BITS = (4, 8)


@dataclasses.dataclass
class BlockQuantized:
    """One quantized weight, in MatMulNBits' layout."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    k: int  # true input channels (rows of W), before padding to the block
    bits: int
    block_size: int
    input_scale: np.ndarray | None = None  # AWQ-style s [K]: stored weight is diag(s)·W, so x must be x / s
    rounded_from: np.ndarray | None = None  # the fp32 [K, N] that was rounded (after scaling and clipping)

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    @property
    def k_blocks(self) -> int:
        return int(self.packed.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scales.nbytes)


def check_block_size(block_size: int, bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (MatMulNBits), got {block_size}")


def block_scales(weight: np.ndarray, bits: int = 4, block_size: int = 32) -> np.ndarray:
    """float32 [N, k_blocks]: per (column, block) the value of largest magnitude / -2^(bits-1)."""
    blocks = _blocks(weight, block_size)  # [N, k_blocks, block]
    index = np.abs(blocks).argmax(axis=-1)[..., None]
    signed_max = np.take_along_axis(blocks, index, axis=-1)[..., 0]
    return (signed_max / np.float32(-(2 ** (bits - 1)))).astype(np.float32)


def quantize_blocks(weight: np.ndarray, bits: int = 4, block_size: int = 32) -> BlockQuantized:
    """Round-to-nearest symmetric block quantization of W [K, N], bit-exact with ONNX Runtime's packing."""
    check_block_size(block_size, bits)
    weight = _as_matrix(weight)
    k = weight.shape[0]
    scales = block_scales(weight, bits, block_size)
    q = quantized_values(weight, scales, bits, block_size)  # uint [N, k_blocks * block]
    n, k_blocks = scales.shape
    q[:, k:] = 0  # padding: 0 (never read)
    packed = (q[:, 0::2] | q[:, 1::2] << 4).astype(np.uint8) if bits == 4 else q.astype(np.uint8)
    return BlockQuantized(packed.reshape(n, k_blocks, -1), scales, k, bits, block_size)


def quantized_values(weight: np.ndarray, scales: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes [N, k_blocks * block_size] of W under the given block scales (float32 arithmetic)."""
    blocks = _blocks(weight, block_size)
    zero = np.float32(2 ** (bits - 1))
    with np.errstate(divide="ignore"):
        reciprocal = np.where(scales != 0, np.float32(1.0) / scales, np.float32(0.0)).astype(np.float32)
    codes = np.floor(blocks * reciprocal[..., None] + zero + np.float32(0.5))
    codes = np.clip(codes, 0, 2**bits - 1).astype(np.uint8)
    return codes.reshape(codes.shape[0], -1)


def unpacked_codes(q: BlockQuantized) -> np.ndarray:
    """The unsigned codes [N, K] stored in `q.packed` (padding dropped)."""
    codes = np.stack([q.packed & 15, q.packed >> 4], axis=-1) if q.bits == 4 else q.packed
    return codes.reshape(q.n, -1)[:, : q.k]


def dequantize_blocks(q: BlockQuantized) -> np.ndarray:
    """W' [K, N] float32 as MatMulNBits dequantizes it: (code - 2^(bits-1)) * scale."""
    codes = unpacked_codes(q).astype(np.float32) - np.float32(2 ** (q.bits - 1))
    scales = np.repeat(q.scales, q.block_size, axis=1)[:, : q.k]
    return (codes * scales).T.copy()


def effective_weight(q: BlockQuantized) -> np.ndarray:
    """What the layer computes with, x @ W_eff: the dequantized weight with the input scale undone."""
    weight = dequantize_blocks(q)
    return weight if q.input_scale is None else weight / q.input_scale[:, None].astype(np.float32)


def signed_blocks(q: BlockQuantized) -> tuple[np.ndarray, np.ndarray]:
    """(values int8 [K, N] in [-8, 7] (4-bit) or [-128, 127], scales float32 [k_blocks, N]): the
    DequantizeLinear(axis=0, block_size) layout, zero point 0; dequantizes to `dequantize_blocks(q)`."""
    values = unpacked_codes(q).astype(np.int16) - 2 ** (q.bits - 1)
    return values.T.astype(np.int8).copy(), q.scales.T.copy()


def tensorrt_blocks(
    weight: np.ndarray, bits: int = 4, block_size: int | None = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(values int8 [K_padded, N], scales float32 [k_blocks, N] > 0): symmetric, zero point 0, positive
    float16-exact scales (TensorRT's form; see the module docstring). `block_size` None: one scale per output
    channel (scales [1, N], values [K, N]). Padding rows (K to the block) are 0."""
    weight = _as_matrix(weight)
    k = weight.shape[0]
    block = block_size or k
    blocks = _blocks(weight, block)  # [N, k_blocks, block]
    top = np.float32(2 ** (bits - 1) - 1)
    amax = np.abs(blocks).max(axis=-1)
    scales = (amax / top).astype(np.float16).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)  # an all-zero block: values 0
    values = np.clip(np.floor(blocks / scales[..., None] + np.float32(0.5)), -top, top).astype(np.int8)
    values = values.reshape(values.shape[0], -1).T  # [K_padded, N]
    return np.ascontiguousarray(values if block_size else values[:k]), np.ascontiguousarray(scales.T)


def pack_int4(values: np.ndarray) -> bytes:
    """Signed int4 values (any shape, row-major) as ONNX stores INT4 tensors: two per byte, low nibble first."""
    flat = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _as_matrix(weight: np.ndarray) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"block quantization takes a 2-D weight [K, N], got shape {weight.shape}")
    return weight.astype(np.float32, copy=False)


def _blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """W [K, N] -> [N, k_blocks, block] with K zero-padded to a multiple of the block."""
    weight = _as_matrix(weight)
    k, n = weight.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((k_blocks * block_size, n), np.float32)
    padded[:k] = weight
    return padded.T.reshape(n, k_blocks, block_size)
