"""Restructure is exact: the compact model computes the masked model's function, with exactly the
dead units' parameters removed, constants folded, and a reloadable compact checkpoint."""

from __future__ import annotations

import pytest
import torch

from exporter.restructure.compact import load_compact, save_compact
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


def test_bert_emptied_layer_keeps_one_zero_unit_and_its_constants() -> None:
    model = build_base_model("bert")
    masks = {
        layer_param("bert", 1, "o"): head_column_mask((H, H), range(4), BERT_HD),
        layer_param("bert", 1, "up"): row_mask((BERT_FFN, H), range(BERT_FFN)),
    }
    removed, plan = assert_same_function(model, masks)
    assert plan.layers[1].shapes.heads == 1 and plan.layers[1].shapes.ffn == 1
    assert removed == bert_head_params(3) + bert_neuron_params(BERT_FFN - 1)
    assert len(plan.layers[1].notes) == 2


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
def test_decoder_emptied_attention_and_mlp(family: str) -> None:
    model = build_base_model(family)
    masks = {
        layer_param(family, 1, "o"): head_column_mask((H, 64), range(8), DEC_HD),
        layer_param(family, 0, "down"): column_mask((H, DEC_FFN), range(DEC_FFN)),
    }
    _, plan = assert_same_function(model, masks)
    assert plan.layers[1].shapes.kv_heads == 1 and plan.layers[0].shapes.ffn == 1


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
