"""Qwen2's q/k/v biases folded into the packed MatMulNBits (exporter/quantize/int4_qkv_bias.py): bit-exact on
the INT4 file, prefill and decode (batch 2, left padding), and Qwen2 then gets Llama's packed-query attention."""

from __future__ import annotations

import numpy as np
import pytest
from test_int4_decode_graph import MAX_POSITIONS, _copy, _prefill_and_steps, decoder  # noqa: F401

from exporter.quantize import int4
from exporter.quantize.int4_qkv_bias import fold_split_biases
from exporter.quantize.int4_stage import PACKED_PROJECTIONS


def _packed(decoder):  # noqa: F811
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq")
    return prepared, int4.cpu_model(decoder.cpu, prepared.plan({}), 4, PACKED_PROJECTIONS)[0]


def test_bias_fold_is_bit_exact_and_only_where_biases_are(decoder):  # noqa: F811
    _, plain = _packed(decoder)
    folded = _copy(plain)
    layers = sum(n.op_type == "GroupQueryAttention" for n in plain.graph.node)
    assert fold_split_biases(folded) == (layers if decoder.family == "qwen2" else 0)
    assert fold_split_biases(folded) == 0  # idempotent: the projection has its bias now
    for want, got in zip(_prefill_and_steps(plain), _prefill_and_steps(folded), strict=True):
        np.testing.assert_array_equal(got, want)


def test_qwen2_gets_the_packed_query_attention(decoder):  # noqa: F811
    prepared, _ = _packed(decoder)
    fused, report = int4.cpu_model(
        decoder.cpu,
        prepared.plan({}),
        4,
        PACKED_PROJECTIONS,
        decode_fusions=True,
        max_positions=MAX_POSITIONS,
    )
    ops = [n.op_type for n in fused.graph.node]
    assert report["counts"]["GroupQueryAttention_packed_rotary"] == ops.count("GroupQueryAttention")
    assert "RotaryEmbedding" not in ops and ops.count("Add") == 0


def test_a_split_output_read_elsewhere_is_left_alone(decoder):  # noqa: F811
    if decoder.family != "qwen2":
        pytest.skip("Llama has no q/k/v biases")
    _, plain = _packed(decoder)
    split = next(n for n in plain.graph.node if n.op_type == "Split" and "q_proj" in n.name)
    plain.graph.output.append(plain.graph.output[0].__class__(name=split.output[1]))  # k read as an output
    assert fold_split_biases(plain) == sum(n.op_type == "GroupQueryAttention" for n in plain.graph.node) - 1
