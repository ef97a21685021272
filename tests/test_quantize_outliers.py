"""Outlier-channel split: exact in fp32, picks the outlier channels, shares the split between Q/K/V-style
consumers of one input."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from quant_test_models import DIM, golden_block, golden_feeds, mlp_with_outlier

from exporter.quantize.outliers import SUFFIX, split_outliers


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


def test_split_is_exact_and_isolates_the_outlier_channel() -> None:
    model = mlp_with_outlier()
    maxima = np.ones(DIM)
    maxima[0] = 1000.0
    split = split_outliers(mlp_with_outlier(), {"layer2/MatMul": maxima}, channels=1)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in split.graph.initializer}
    assert inits["layer2/MatMul/outlier_index"].tolist() == [0]
    assert inits["layer2/MatMul/inlier_mask"][0] == 0 and inits["layer2/MatMul/inlier_mask"][1:].all()
    x = {"x": np.random.default_rng(0).normal(0, 1, (2, 4, DIM)).astype(np.float32)}
    err = np.abs(_run(split, x)[0] - _run(model, x)[0])
    assert err.max() < 1e-3, f"max abs error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


def test_consumers_of_one_input_share_the_split() -> None:
    names = {"q_proj": np.arange(DIM, dtype=float), "k_proj": np.arange(DIM, dtype=float)}
    split = split_outliers(golden_block(), names, channels=2)
    ops = Counter(n.op_type for n in split.graph.node)
    assert ops["Gather"] == 1 and ops["Mul"] == 1  # one split of ln0 for both projections
    assert sum(n.name.endswith(SUFFIX) for n in split.graph.node) == 2
    for ref, out in zip(_run(golden_block(), golden_feeds()), _run(split, golden_feeds()), strict=True):
        assert np.abs(ref - out).max() < 1e-4
