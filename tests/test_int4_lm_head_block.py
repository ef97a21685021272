"""The lm_head's own block size (exporter/quantize/int4.py `prepare(block_sizes=...)`, int4_stage's
LM_HEAD_BLOCK_SIZE): fewer scale bytes on the largest weight, the rest unchanged, both files the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from test_int4 import Decoder

from exporter.quantize import int4
from exporter.quantize.blocks import dequantize_blocks, quantize_blocks
from exporter.quantize.int4_stage import Int4Config, _is_lm_head


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decoder(request, tmp_path_factory):
    return Decoder(request.param, tmp_path_factory.mktemp(request.param))


def _lm_head(decoder) -> str:
    return next(s.node for s in decoder.sites if _is_lm_head(decoder.cpu, s))


def test_lm_head_block_reaches_both_files_and_nothing_else(decoder):
    head = _lm_head(decoder)
    plan = int4.prepare(decoder.cpu, decoder.sites, None, method="rtn", block_sizes={head: 64}).plan()
    assert {n: q.block_size for n, q in plan.weights.items() if q.block_size != 32} == {head: 64}
    model, _ = int4.cpu_model(decoder.cpu, plan)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == f"{head}_Q4")
    name = next(s.weight for s in decoder.sites if s.node == head)
    weight = numpy_helper.to_array(next(i for i in decoder.cpu.graph.initializer if i.name == name))
    reference = quantize_blocks(weight, 4, 64)
    assert {a.name: a.i for a in node.attribute}["block_size"] == 64
    assert inits[node.input[1]].tobytes() == reference.packed.tobytes()
    np.testing.assert_array_equal(inits[node.input[2]], reference.scales.reshape(-1))
    assert decoder.cosine(model) > 0.5
    trt, _ = int4.tensorrt_model(decoder.trt, plan)
    dq = next(n for n in trt.graph.node if n.op_type == "DequantizeLinear" and head in n.name)
    assert {a.name: a.i for a in dq.attribute}["block_size"] == 64
    np.testing.assert_allclose(plan.weights[head].rounded_from, weight)  # RTN: rounded from W itself
    np.testing.assert_array_equal(dequantize_blocks(plan.weights[head]), dequantize_blocks(reference))


def test_awq_searches_the_lm_head_at_its_own_block(decoder):
    """The lm_head's input scale is searched and its error measured at its block (activation blocks too)."""
    head = _lm_head(decoder)
    prepared = int4.prepare(decoder.cpu, decoder.sites, decoder.rows, method="awq", block_sizes={head: 64})
    quantized, report = prepared.quantized(head, 4)
    assert quantized.block_size == report.block_size == 64 and prepared.block_of(head) == 64
    assert all(prepared.quantized(s.node, 4)[0].block_size == 32 for s in decoder.sites if s.node != head)


def test_lm_head_block_is_at_least_the_block_and_checked():
    assert Int4Config().lm_head_block() == 128 and Int4Config(block_size=256).lm_head_block() == 256
    from export_errors import InputError

    with pytest.raises(InputError, match="lm_head_block_size"):
        Int4Config(lm_head_block_size=100).validate()


@pytest.mark.parametrize("kind", ["cost", "worst"])
@pytest.mark.parametrize("met_without", [True, False])
def test_the_lm_head_is_widened_last(decoder, tmp_path, monkeypatch, met_without, kind):
    """The mixed-precision search (either order) runs first without the lm_head among its candidates; only
    where that misses the target does it run again with it (an 8-bit lm_head is the most bytes per step)."""
    from exporter.quantize import int4_stage
    from exporter.quantize.sensitivity import SensitivityResult

    calls: list[list[str]] = []

    def search(candidates, evaluate, target, budget, sweep):  # type: ignore[no-untyped-def]
        calls.append(list(candidates))
        met = met_without or len(calls) > 1
        return SensitivityResult([], 1.0, 1.0, {}, [], met=met)

    def search_by_cost(units, cost, evaluate, target, budget, sweep):  # type: ignore[no-untyped-def]
        assert all(n in cost for u in units for n in u)
        return search([n for u in units for n in u], evaluate, target, budget, sweep)

    monkeypatch.setattr(int4_stage, "search", search)
    monkeypatch.setattr(int4_stage, "search_by_cost", search_by_cost)
    config = Int4Config(
        min_cosine=0.5, search=kind
    )  # the stub widens nothing: the all-4-bit tiny model passes
    int4_stage.run_int4_stage(decoder.exported, tmp_path, decoder.calibration, config, family=decoder.family)
    head = _lm_head(decoder)
    assert head not in calls[0] and len(calls) == (1 if met_without else 2)
    if not met_without:
        assert head in calls[1]
