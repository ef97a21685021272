"""Block quantization (exporter/quantize/blocks.py) bit-exact against ONNX Runtime's own packing, and its
dequantization equal to what ONNX Runtime's MatMulNBits and blocked DequantizeLinear compute."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from exporter.quantize.blocks import (
    dequantize_blocks,
    pack_int4,
    quantize_blocks,
    signed_blocks,
    unpacked_codes,
)


def ort_packing(weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's symmetric block quantization, as matmul_nbits_quantizer.py calls it."""
    k, n = weight.shape
    k_blocks = -(-k // block)
    padded = np.pad(weight, ((0, k_blocks * block - k), (0, 0)))
    packed = np.zeros((n, k_blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, padded, scales, zero_points, block, n, k, True)
    return packed, scales


def weights(seed: int, k: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * np.float32(10 ** rng.uniform(-3, 1))
    w[:, 0] = 0.0  # an all-zero column: scale 0
    w[: min(k, 5), 1] *= 40  # an outlier in the first block
    return w


SHAPES = [(64, 48), (72, 24), (100, 33), (16, 5), (129, 7)]  # K not a multiple of the block: pruned widths


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_packing_is_bit_exact_with_onnxruntime(bits, block, shape):
    w = weights(hash((bits, block, shape)) % 1000, *shape)
    ours = quantize_blocks(w, bits, block)
    packed, scales = ort_packing(w, bits, block)
    np.testing.assert_array_equal(ours.scales, scales)
    theirs = dataclasses.replace(ours, packed=packed)
    np.testing.assert_array_equal(unpacked_codes(ours), unpacked_codes(theirs))  # every real value
    if shape[0] % 2 == 0:  # no padding nibble shares a byte with a real value: the bytes are identical
        assert ours.packed.tobytes() == packed.tobytes()


def test_rounding_ties_match_onnxruntime():
    """Values exactly halfway between two codes: ONNX Runtime rounds half up (floor(x + 0.5))."""
    w = (np.arange(-8, 8, 0.5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32))[:32]
    w[0] = -8.0
    ours = quantize_blocks(w, 4, 32)
    packed, _ = ort_packing(w, 4, 32)
    assert ours.packed.tobytes() == packed.tobytes()


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(72, 24), (100, 33)])
def test_matmulnbits_dequantizes_to_our_reference(bits, shape):
    """MatMulNBits (accuracy_level 0: fp32 compute) on the identity matrix returns its dequantized weight:
    it must equal dequantize_blocks exactly."""
    k, n = shape
    q = quantize_blocks(weights(7, k, n), bits, 32)
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=32
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
        [numpy_helper.from_array(q.packed, "b"), numpy_helper.from_array(q.scales.reshape(-1), "s")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    got = _run(model, {"x": np.eye(k, dtype=np.float32)})
    np.testing.assert_array_equal(got, dequantize_blocks(q))


@pytest.mark.parametrize("shape", [(64, 24), (100, 33)])
def test_blocked_dequantizelinear_dequantizes_to_our_reference(shape):
    """The TensorRT layout (signed int4, scales [k_blocks, N], axis 0, block_size) on ONNX Runtime's
    DequantizeLinear (opset 21) gives the same weight as MatMulNBits."""
    k, n = shape
    q = quantize_blocks(weights(3, k, n), 4, 32)
    values, scales = signed_blocks(q)
    assert values.min() >= -8 and values.max() <= 7 and scales.shape == (q.k_blocks, n)
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0, block_size=32)
    w = helper.make_tensor("w", TensorProto.INT4, [k, n], pack_int4(values), raw=True)
    graph = helper.make_graph(
        [node],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
        [w, numpy_helper.from_array(scales, "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    np.testing.assert_array_equal(_run(model, {}), dequantize_blocks(q))


def test_bad_block_size_and_shape_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        quantize_blocks(np.zeros((8, 8), np.float32), 4, 24)
    with pytest.raises(ValueError, match="2-D"):
        quantize_blocks(np.zeros((2, 8, 8), np.float32), 4, 32)
