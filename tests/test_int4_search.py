"""INT4's cost-aware mixed-precision search (exporter/quantize/int4_search.py): the bytes it counts, the units it
widens (a packed q/k/v or gate/up group as one), the order (error per extra byte) and the stop rule, with a
stubbed evaluation whose cosine is 1 - the summed errors of the pieces left at 4 bits."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from exporter.quantize.int4_search import search_by_cost, step_bytes, units
from exporter.quantize.int4_stage import PACKED_PROJECTIONS


def test_step_bytes_counts_codes_of_padded_k_and_fp32_scales():
    assert step_bytes(64, 10, 4, 32) == 10 * (64 // 2 + 2 * 4)
    assert step_bytes(64, 10, 8, 32) == 10 * (64 + 2 * 4)
    assert step_bytes(100, 1, 4, 32) == 4 * 16 + 4 * 4  # K padded to 128
    assert step_bytes(512, 512, 4, 128) < step_bytes(512, 512, 4, 32)


def _graph() -> onnx.ModelProto:
    names = [
        ("x0", "/l0/q_proj/MatMul"),
        ("x0", "/l0/k_proj/MatMul"),
        ("x0", "/l0/v_proj/MatMul"),
        ("a0", "/l0/o_proj/MatMul"),
        ("x1", "/l0/gate_proj/MatMul"),
        ("x1", "/l0/up_proj/MatMul"),
        ("h0", "/l0/down_proj/MatMul"),
    ]
    nodes = [helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=n) for i, (x, n) in enumerate(names)]
    graph = helper.make_graph(nodes, "g", [], [])
    return helper.make_model(graph)


def test_units_group_what_packs():
    got = units(_graph(), [n.name for n in _graph().graph.node] + ["<embedding>"], PACKED_PROJECTIONS)
    assert got == [
        ("/l0/q_proj/MatMul", "/l0/k_proj/MatMul", "/l0/v_proj/MatMul"),
        ("/l0/o_proj/MatMul",),
        ("/l0/gate_proj/MatMul", "/l0/up_proj/MatMul"),
        ("/l0/down_proj/MatMul",),
        ("<embedding>",),
    ]


ERRORS = {"qkv": 0.02, "o": 0.015, "down": 0.03, "emb": 0.004}
COST = {"qkv": 300.0, "o": 100.0, "down": 1000.0, "emb": 1.0}


def _stub(calls: list[frozenset[str]]):
    def evaluate(wide: frozenset[str]) -> float:
        calls.append(wide)
        return 1.0 - sum(e for n, e in ERRORS.items() if n not in wide)

    def sweep(groups):
        return {u: 1.0 - sum(ERRORS[n] for n in u) for u in groups}

    return evaluate, sweep


def test_widens_by_error_per_byte_until_the_target():
    calls: list[frozenset[str]] = []
    evaluate, sweep = _stub(calls)
    unit_list = [(n,) for n in ERRORS]
    # error/byte: emb 4e-3, o 1.5e-4, qkv 6.7e-5, down 3e-5 -> emb, o, qkv, then down
    result = search_by_cost(unit_list, COST, evaluate, target=1.0 - 0.031, max_pieces=10, sweep=sweep)
    assert result.excluded == ["emb", "o", "qkv"]  # worst-first would have taken the 1000-byte down first
    assert result.met and result.cosine == pytest.approx(0.97)
    assert calls[0] == frozenset()


def test_met_at_all_four_bits_widens_nothing_and_budget_stops():
    evaluate, sweep = _stub([])
    unit_list = [(n,) for n in ERRORS]
    assert search_by_cost(unit_list, COST, evaluate, 0.9, 10, sweep).excluded == []
    capped = search_by_cost(unit_list, COST, evaluate, 0.999, 2, sweep)
    assert capped.excluded == ["emb", "o"] and not capped.met


def test_a_group_is_widened_as_one_unit_and_its_cost_is_summed():
    errors = {"q": 0.0, "k": 0.0, "v": 0.05, "o": 0.01}
    cost = {"q": 300.0, "k": 100.0, "v": 100.0, "o": 60.0}

    def evaluate(wide):
        return 1.0 - sum(e for n, e in errors.items() if n not in wide)

    def sweep(groups):
        return {u: 1.0 - sum(errors[n] for n in u) for u in groups}

    # v alone would be 5e-4 per byte (first); as the packed q/k/v group 1e-4 < o's 1.7e-4: o goes first
    result = search_by_cost([("q", "k", "v"), ("o",)], cost, evaluate, 0.999, 10, sweep)
    assert result.excluded == ["o", "q", "k", "v"]
    assert result.layer_error["q"] == pytest.approx(0.05)


def _decoder_graph(hidden: int, o_width: int) -> onnx.ModelProto:
    """Embedding [V, hidden] -> q/k/v (K = hidden) -> o_proj (K = o_width, a pruned layer) -> lm_head."""
    import numpy as np
    from onnx import numpy_helper

    shapes = {"q": (hidden, hidden), "k": (hidden, 16), "o": (o_width, hidden), "lm_head": (hidden, 50)}
    inits = [numpy_helper.from_array(np.zeros((50, hidden), np.float32), "embed")]
    inits += [numpy_helper.from_array(np.zeros(s, np.float32), f"w_{n}") for n, s in shapes.items()]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x"], name="embed_gather"),
        helper.make_node("MatMul", ["x", "w_q"], ["q"], name="/l0/q_proj/MatMul"),
        helper.make_node("MatMul", ["x", "w_k"], ["k"], name="/l0/k_proj/MatMul"),
        helper.make_node("MatMul", ["a", "w_o"], ["o"], name="/l0/o_proj/MatMul"),
        helper.make_node("MatMul", ["o", "w_lm_head"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 1]),
            helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, 1, o_width]),
        ],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph)


@pytest.mark.parametrize(
    ("hidden", "o_width", "requested", "block", "others"),
    [
        (512, 256, 128, 128, {"/lm_head/MatMul": 128}),  # the bench model's widths: 128 everywhere
        (64, 32, 128, 64, {"/l0/o_proj/MatMul": 32, "/lm_head/MatMul": 128}),  # tiny: at most hidden, o at K
        (512, 256, 32, 32, {"/lm_head/MatMul": 128}),  # --int4-block-size 32: as asked, lm_head 128
        (512, 100, 128, 128, {"/l0/o_proj/MatMul": 64, "/lm_head/MatMul": 128}),  # K 100: 64, not 128 padded
    ],
)
def test_effective_block_sizes(hidden, o_width, requested, block, others):
    from exporter.quantize import int4
    from exporter.quantize.int4_stage import Int4Config, effective_block_sizes

    model = _decoder_graph(hidden, o_width)
    sites = int4.find_sites(model)
    got_block, got_others = effective_block_sizes(model, sites, Int4Config(block_size=requested))
    assert (got_block, got_others) == (block, others)
