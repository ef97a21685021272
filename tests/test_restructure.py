"""Restructure is exact: the compact model computes the masked model's function, with exactly the
dead units' parameters removed, constants folded, and a reloadable compact checkpoint."""

from __future__ import annotations

import pytest
import torch

from exporter.restructure.compact import load_compact, save_compact
from exporter.restructure.families.sublayers import CompactDecoderLayer, RemovedBertAttention
from exporter.restructure.remove_dead import count_params, restructure
from exporter.testing.synthetic import (
    broadcast_mask,
    build_base_model,
    column_mask,
    gqa_group_masks,
    head_column_mask,
    head_row_mask,
    layer_param,
    row_mask,
)
from exporter.validate.tolerances import tolerance

TOL = tolerance("fp32").max_abs
H, BERT_HD, BERT_FFN = 64, 16, 128
DEC_HD, DEC_FFN = 8, 96


@torch.no_grad()
def masked(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> torch.nn.Module:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(broadcast_mask(mask, params[name].shape))
    return model


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 17), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def outputs(model: torch.nn.Module) -> torch.Tensor:
    out = model(**inputs())
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def assert_same_function(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> tuple[int, object]:
    masked(model, masks)
    reference = outputs(model)
    before = count_params(model)
    plan = restructure(model)
    err = (outputs(model) - reference).abs()
    assert err.max() <= TOL, f"max abs err {err.max():.3g} at {divmod(int(err.argmax()), err.shape[-1])}"
    return before - count_params(model), plan


def bert_head_params(heads: int) -> int:
    return heads * (3 * (BERT_HD * H + BERT_HD) + H * BERT_HD)


def bert_neuron_params(neurons: int) -> int:
    return neurons * (H + 1 + H)


def test_bert_ffn_rows_with_bias_are_folded_not_dropped() -> None:
    model = build_base_model("bert")
    name = layer_param("bert", 0, "up")
    removed, plan = assert_same_function(model, {name: row_mask((BERT_FFN, H), range(0, 64))})
    assert removed == bert_neuron_params(64)
    assert plan.layers[0].shapes.ffn == 64
    assert plan.layers[0].removed == {"ffn neurons: zero input row (act(bias) folded)": 64}


def test_dropping_the_gelu_bias_constant_would_be_caught() -> None:
    """Negative control: the folded constant is large enough that omitting it breaks the tolerance."""
    model = build_base_model("bert")
    masked(model, {layer_param("bert", 0, "up"): row_mask((BERT_FFN, H), range(64))})
    reference = outputs(model)
    with torch.no_grad():
        layer = model.encoder.layer[0]
        layer.intermediate.dense.bias[:64] = -1e4  # GELU(-1e4) = 0: the constant is lost
    assert (outputs(model) - reference).abs().max() > 1e-2


def test_bert_heads_by_output_columns_and_by_value_rows_with_bias() -> None:
    model = build_base_model("bert")
    masks = {
        layer_param("bert", 0, "o"): head_column_mask((H, H), [0], BERT_HD),
        layer_param("bert", 0, "v"): head_row_mask((H, H), [2], BERT_HD),
        layer_param("bert", 1, "down"): column_mask((H, BERT_FFN), range(100)),
    }
    removed, plan = assert_same_function(model, masks)
    assert removed == bert_head_params(2) + bert_neuron_params(100)
    assert plan.layers[0].heads_kept == [1, 3]
    assert plan.layers[1].shapes.ffn == BERT_FFN - 100


def test_bert_emptied_layer_loses_both_sublayers_and_keeps_their_constants() -> None:
    model = build_base_model("bert")
    masks = {
        layer_param("bert", 1, "o"): head_column_mask((H, H), range(4), BERT_HD),
        layer_param("bert", 1, "up"): row_mask((BERT_FFN, H), range(BERT_FFN)),
    }
    removed, plan = assert_same_function(model, masks)
    assert plan.layers[1].shapes.heads == 0 and plan.layers[1].shapes.ffn == 0
    assert plan.layers[1].sublayers_removed == ["attention", "mlp"]
    # every head and neuron goes; each output bias becomes the residual constant of the same size
    assert removed == bert_head_params(4) + bert_neuron_params(BERT_FFN)
    layer = model.encoder.layer[1]
    assert isinstance(layer.attention, RemovedBertAttention) and isinstance(
        layer.intermediate, torch.nn.Identity
    )
    assert layer.output.residual_bias is not None  # GELU(b1)·W2 folded: it is what the LayerNorm needs
    assert len(plan.layers[1].notes) == 2
    assert plan.layers[0].sublayers_removed == []


def decoder_group_params(family: str, groups: int) -> int:
    q_heads = 2 * groups
    qkv_bias = DEC_HD if family == "qwen2" else 0
    return q_heads * (DEC_HD * H + qkv_bias) + 2 * groups * (DEC_HD * H + qkv_bias) + q_heads * DEC_HD * H


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_whole_gqa_group_and_gated_mlp_rows(family: str) -> None:
    model = build_base_model(family)
    config = model.config
    masks = dict(gqa_group_masks(config, family, 0, 1))
    masks[layer_param(family, 0, "gate")] = row_mask((DEC_FFN, H), range(0, 30))
    masks[layer_param(family, 1, "up")] = row_mask((DEC_FFN, H), range(10, 20))
    masks[layer_param(family, 1, "down")] = column_mask((H, DEC_FFN), range(50, 60))
    removed, plan = assert_same_function(model, masks)
    assert plan.layers[0].kv_heads_kept == [0, 2, 3]
    assert plan.layers[0].shapes.heads == 6
    assert removed == decoder_group_params(family, 1) + 50 * 3 * H


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_dead_query_head_in_live_group_is_kept_and_said(family: str) -> None:
    model = build_base_model(family)
    masks = {layer_param(family, 0, "o"): head_column_mask((H, 64), [5], DEC_HD)}
    removed, plan = assert_same_function(model, masks)
    assert removed == 0
    assert any("[5]" in note for note in plan.layers[0].notes)


def test_qwen2_value_rows_with_bias_fold_into_a_new_o_proj_bias() -> None:
    model = build_base_model("qwen2")
    assert model.model.layers[0].self_attn.o_proj.bias is None
    masks = {layer_param("qwen2", 0, "v"): head_row_mask((32, H), [3], DEC_HD)}
    removed, plan = assert_same_function(model, masks)
    assert plan.layers[0].removed == {"kv groups: zero value rows (value bias folded)": 1}
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    assert removed == decoder_group_params("qwen2", 1) - H  # the new o_proj bias adds H parameters


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_emptied_attention_and_mlp_are_removed(family: str) -> None:
    model = build_base_model(family)
    masks = {
        layer_param(family, 1, "o"): head_column_mask((H, 64), range(8), DEC_HD),
        layer_param(family, 0, "down"): column_mask((H, DEC_FFN), range(DEC_FFN)),
    }
    _, plan = assert_same_function(model, masks)
    assert (plan.layers[1].shapes.heads, plan.layers[1].shapes.kv_heads) == (0, 0)
    assert plan.layers[0].shapes.ffn == 0
    assert plan.sublayers_removed() == {0: ["mlp"], 1: ["attention"]}
    first, second = model.model.layers
    assert isinstance(first, CompactDecoderLayer) and first.mlp is None and first.mlp_residual_bias is None
    assert (
        isinstance(second, CompactDecoderLayer)
        and second.self_attn is None
        and second.input_layernorm is None
    )
    assert first.self_attn.layer_idx == 0  # the only attention left writes cache slot 0
    # FLOPs: the removed attention's projections and context term, and the removed gated MLP
    attention = 2 * H * DEC_HD * (2 * 8 + 2 * 4)
    assert plan.layers[1].flops_saved_by_sublayer_removal == {
        "fixed": attention,
        "per_context_token": 4 * 8 * DEC_HD,
    }
    assert plan.layers[0].flops_saved_by_sublayer_removal == {
        "fixed": 2 * H * DEC_FFN * 3,
        "per_context_token": 0,
    }


def test_qwen2_removed_attention_keeps_its_folded_value_bias_for_the_residual() -> None:
    """Every KV group value-dead: the attention outputs W_o·b_v for every token, added to the residual."""
    model = build_base_model("qwen2")
    _, plan = assert_same_function(
        model, {layer_param("qwen2", 0, "v"): head_row_mask((32, H), range(4), DEC_HD)}
    )
    assert plan.layers[0].sublayers_removed == ["attention"]
    assert model.model.layers[0].attn_residual_bias is not None
    assert model.model.layers[1].self_attn.layer_idx == 0


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_restructure_twice_changes_nothing(family: str) -> None:
    model = build_base_model(family)
    masks = {layer_param(family, 0, "up"): row_mask((model.config.intermediate_size, H), range(7))}
    assert_same_function(model, masks)
    again = restructure(model)
    assert again.params_before == again.params_after
    assert all(not layer.removed for layer in again.layers)


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_compact_model_reloads_exactly(family: str, tmp_path) -> None:
    model = build_base_model(family)
    name = layer_param(family, 0, "o")
    hd = BERT_HD if family == "bert" else DEC_HD
    width = model.get_parameter(name).shape[1]
    masks = {name: head_column_mask((H, width), range(2 if family == "bert" else 4), hd)}
    if family == "qwen2":
        masks[layer_param(family, 1, "v")] = head_row_mask((32, H), [0], DEC_HD)
    _, plan = assert_same_function(model, masks)
    save_compact(model, plan, tmp_path)
    reloaded = load_compact(tmp_path)
    assert count_params(reloaded) == count_params(model)
    assert torch.equal(outputs(reloaded), outputs(model))


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_compact_model_with_removed_sublayers_reloads_exactly(family: str, tmp_path) -> None:
    """Layer 0 loses its attention (value rows: qwen2 / BERT keep a constant), layer 1 its FFN."""
    model = build_base_model(family)
    hd = BERT_HD if family == "bert" else DEC_HD
    kv_width = model.get_parameter(layer_param(family, 0, "v")).shape[0]
    ffn = model.config.intermediate_size
    masks = {
        layer_param(family, 0, "v"): head_row_mask((kv_width, H), range(kv_width // hd), hd),
        layer_param(family, 1, "up"): row_mask((ffn, H), range(ffn)),
    }
    _, plan = assert_same_function(model, masks)
    assert plan.sublayers_removed() == {0: ["attention"], 1: ["mlp"]}
    save_compact(model, plan, tmp_path)
    reloaded = load_compact(tmp_path)
    assert count_params(reloaded) == count_params(model)
    assert torch.equal(outputs(reloaded), outputs(model))
