"""Property-based tests (hypothesis): for random structured masks on tiny models of every family, the
compact model computes the masked model's function, has exactly the shapes the masks imply, and never
has more parameters than before except for a bias added to hold a folded constant.

Masks drawn per layer: FFN neurons by input rows (BERT: intermediate rows, biases kept so GELU(b) is
folded; decoders: gate or up rows) and by output columns; heads by output-projection columns or by
value rows (decoders: value rows of a KV head, i.e. its whole GQA group; qwen2's value bias is
folded); whole GQA groups; a whole layer's attention or FFN emptied (the sublayer is then removed, its
constant kept); plus query/key rows that kill no
unit (uniform attention) and must not be removed. The expected compact shapes are computed here from
the masks alone, independently of the planner. In memory only: no disk, no ONNX.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from exporter.restructure.remove_dead import count_params, restructure
from exporter.testing.synthetic import broadcast_mask, build_base_model, head_span, layer_param
from exporter.validate.tolerances import tolerance

TOL = tolerance("fp32").max_abs
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "25")),
    deadline=None,
    derandomize=os.environ.get("PROPERTY_RANDOM", "") == "",  # CI: a fixed sample; PROPERTY_RANDOM=1 explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@functools.cache
def base_model(family: str) -> nn.Module:
    return build_base_model(family, seed=0)


@dataclass
class Shape:
    """The model dimensions the strategies need."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def shape_of(family: str) -> Shape:
    config = base_model(family).config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        family, config.num_hidden_layers, config.hidden_size, heads, kv, head_dim, config.intermediate_size
    )


@dataclass
class MaskCase:
    """Masks (parameter name -> full-shape 0/1 tensor) and the compact shapes they imply per layer."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    expected: list[tuple[int, int, int]] = field(default_factory=list)  # (heads, kv_heads, ffn) per layer
    description: list[str] = field(default_factory=list)

    def kill_rows(self, name: str, shape: tuple[int, int], rows: list[int]) -> None:
        mask = torch.ones(shape)
        mask[rows, :] = 0
        self._combine(name, mask)

    def kill_cols(self, name: str, shape: tuple[int, int], cols: list[int]) -> None:
        mask = torch.ones(shape)
        mask[:, cols] = 0
        self._combine(name, mask)

    def _combine(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = self.masks[name] * mask if name in self.masks else mask


def subset(n: int) -> st.SearchStrategy[list[int]]:
    """A random subset of range(n) of at most half of it (whole sublayers are emptied separately)."""
    return st.lists(st.integers(0, n - 1), unique=True, max_size=max(1, n // 2))


def emptied_by(routes: list[str]) -> st.SearchStrategy[str | None]:
    """None (3 times in 4: partial pruning), or the route by which a whole sublayer is emptied."""
    return st.one_of(st.none(), st.none(), st.none(), st.sampled_from(routes))


@st.composite
def mask_cases(draw: st.DrawFn, family: str) -> MaskCase:
    s = shape_of(family)
    case = MaskCase()
    for layer in range(s.layers):
        heads = draw_attention(draw, s, layer, case)
        ffn = draw_ffn(draw, s, layer, case)
        case.expected.append((*heads, ffn))
    return case


def draw_attention(draw: st.DrawFn, s: Shape, layer: int, case: MaskCase) -> tuple[int, int]:
    """Heads dead by output columns and (value rows of) KV heads; returns expected (heads, kv_heads)."""
    name = lambda role: layer_param(s.family, layer, role)  # noqa: E731
    q_width, kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
    o_cols = sorted(draw(subset(s.heads), label=f"L{layer} heads by o columns"))
    v_rows = sorted(draw(subset(s.kv_heads), label=f"L{layer} kv heads by value rows"))
    whole_groups = sorted(draw(subset(s.kv_heads), label=f"L{layer} whole GQA groups")) if s.group > 1 else []
    empty = draw(emptied_by(["o", "v", "groups"] if s.group > 1 else ["o", "v"]), label=f"L{layer} emptied")
    if empty == "o":
        o_cols = list(range(s.heads))
    elif empty == "v":
        v_rows = list(range(s.kv_heads))
    elif empty == "groups":
        whole_groups = list(range(s.kv_heads))
    distractors = draw(st.lists(st.integers(0, s.heads - 1), max_size=2), label=f"L{layer} q/k rows")
    if o_cols:
        case.kill_cols(name("o"), (s.hidden, q_width), head_span(o_cols, s.head_dim))
    if v_rows:
        case.kill_rows(name("v"), (kv_width, s.hidden), head_span(v_rows, s.head_dim))
    for group in whole_groups:  # synthetic.gqa_group_masks: all its query heads' columns + its value rows
        q_heads = range(group * s.group, (group + 1) * s.group)
        case.kill_cols(name("o"), (s.hidden, q_width), head_span(q_heads, s.head_dim))
        case.kill_rows(name("v"), (kv_width, s.hidden), head_span([group], s.head_dim))
    for head in distractors:  # zero query/key rows make attention uniform: nothing to remove
        role, width = ("q", q_width) if head % 2 == 0 else ("k", kv_width)
        row_head = head if role == "q" else head % s.kv_heads
        case.kill_rows(name(role), (width, s.hidden), head_span([row_head], s.head_dim))
    dead_groups = set(v_rows) | set(whole_groups)
    dead_groups |= {g for g in range(s.kv_heads) if set(range(g * s.group, (g + 1) * s.group)) <= set(o_cols)}
    kv_kept = s.kv_heads - len(dead_groups)  # 0: the attention sublayer is removed
    case.description.append(f"L{layer}: o cols {o_cols}, v rows {v_rows}, groups {whole_groups}")
    if s.family == "bert":  # one query head per "group": each head is its own unit
        return kv_kept, None  # type: ignore[return-value]
    return kv_kept * s.group, kv_kept


def draw_ffn(draw: st.DrawFn, s: Shape, layer: int, case: MaskCase) -> int:
    """FFN neurons dead by input rows (up / gate) or output columns (down); returns the expected width."""
    name = lambda role: layer_param(s.family, layer, role)  # noqa: E731
    in_roles = ["up"] if s.family == "bert" else ["gate", "up"]
    empty = draw(emptied_by([*in_roles, "down"]), label=f"L{layer} ffn emptied")
    dead: set[int] = set()
    for role in in_roles:
        rows = list(range(s.ffn)) if empty == role else draw(subset(s.ffn), label=f"L{layer} ffn {role} rows")
        if rows:
            case.kill_rows(name(role), (s.ffn, s.hidden), rows)
        dead |= set(rows)
    cols = list(range(s.ffn)) if empty == "down" else draw(subset(s.ffn), label=f"L{layer} ffn down columns")
    if cols:
        case.kill_cols(name("down"), (s.hidden, s.ffn), cols)
    dead |= set(cols)
    case.description.append(f"L{layer}: ffn dead {len(dead)}")
    return s.ffn - len(dead)  # 0: the FFN sublayer is removed


# ------------------------------------------------------------------------------------------- checking


def model_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 13), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0  # padding: attention masks are exercised
    return {"input_ids": ids, "attention_mask": attention}


@torch.no_grad()
def model_outputs(model: nn.Module) -> torch.Tensor:
    out = model(**model_inputs())
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@torch.no_grad()
def masked_copy(family: str, masks: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(base_model(family))
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(broadcast_mask(mask, params[name].shape))
    return model


def output_biases(model: nn.Module) -> dict[str, int]:
    """Linear layers that have a bias, with its length."""
    return {
        n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
    }


def check_case(family: str, case: MaskCase) -> None:
    model = masked_copy(family, case.masks)
    reference = model_outputs(model)
    before, biases_before = count_params(model), output_biases(model)
    plan = restructure(model)

    err = (model_outputs(model) - reference).abs()
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert err.max() <= TOL, f"max abs err {err.max():.3g} at {worst}; masks: {case.description}"

    added = {n: k for n, k in output_biases(model).items() if n not in biases_before}
    assert count_params(model) <= before + sum(added.values()), f"parameters grew: added biases {added}"
    assert count_params(model) == plan.params_after
    for layer_plan in plan.layers:
        layer_added = sum(k for n, k in added.items() if f".{layer_plan.layer}." in n)
        assert layer_plan.params_after <= layer_plan.params_before + layer_added, layer_plan

    shapes = [(p.shapes.heads, p.shapes.kv_heads, p.shapes.ffn) for p in plan.layers]
    assert shapes == case.expected, f"compact shapes {shapes} != expected {case.expected}: {case.description}"


@PROPERTY_SETTINGS
@given(case=mask_cases("bert"))
def test_bert_compact_equals_masked(case: MaskCase) -> None:
    check_case("bert", case)


@PROPERTY_SETTINGS
@given(case=mask_cases("llama"))
def test_llama_compact_equals_masked(case: MaskCase) -> None:
    check_case("llama", case)


@PROPERTY_SETTINGS
@given(case=mask_cases("qwen2"))
def test_qwen2_compact_equals_masked(case: MaskCase) -> None:
    check_case("qwen2", case)


def test_the_check_catches_a_dropped_constant(monkeypatch) -> None:
    """Negative control: a restructure that forgets a folded constant must fail `check_case`."""
    from exporter.restructure.families import bert

    s = shape_of("bert")
    case = MaskCase()
    case.kill_rows(layer_param("bert", 0, "up"), (s.ffn, s.hidden), list(range(10)))
    case.expected = [(s.heads, None, s.ffn - 10), (s.heads, None, s.ffn)]  # type: ignore[list-item]
    real_apply = bert.apply_layer

    def forget_bias(layer, plan, hd):  # type: ignore[no-untyped-def]
        layer = real_apply(layer, plan, hd)
        if plan.layer == 0:
            with torch.no_grad():
                layer.output.dense.bias.zero_()
        return layer

    monkeypatch.setattr(bert, "apply_layer", forget_bias)
    with pytest.raises(AssertionError, match="max abs err"):
        check_case("bert", case)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_removed_counts_match_the_compact_shapes_of_emptied_layers(family: str) -> None:
    """The report's per-reason counts must add up to the units that are actually gone."""
    s = shape_of(family)
    case = MaskCase()
    case.kill_cols(
        layer_param(family, 1, "o"), (s.hidden, s.heads * s.head_dim), list(range(s.heads * s.head_dim))
    )
    case.kill_cols(layer_param(family, 0, "down"), (s.hidden, s.ffn), list(range(s.ffn)))
    model = masked_copy(family, case.masks)
    plan = restructure(model)
    for layer in plan.layers:
        heads_removed = sum(
            n for reason, n in layer.removed.items() if reason.startswith(("heads", "kv groups"))
        )
        ffn_removed = sum(n for reason, n in layer.removed.items() if reason.startswith("ffn"))
        units_before = s.kv_heads if family != "bert" else s.heads
        units_after = layer.shapes.kv_heads if family != "bert" else layer.shapes.heads
        assert heads_removed == units_before - units_after, layer
        assert ffn_removed == s.ffn - layer.shapes.ffn, layer
