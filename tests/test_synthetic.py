"""The synthetic MODEL_DIR builders write what users' tools write, deterministically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from exporter.testing.synthetic import (
    FAMILIES,
    LoraSpec,
    build_base_model,
    gqa_group_masks,
    head_column_mask,
    head_row_mask,
    layer_param,
    row_mask,
    tiny_config,
    write_model_dir,
)

TARGETS = {
    "bert": ("query", "value"),
    "llama": ("q_proj", "up_proj"),
    "qwen2": ("v_proj", "down_proj"),
    "mistral": ("k_proj", "gate_proj"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_is_seeded_with_nonzero_biases(family: str) -> None:
    a, b, c = build_base_model(family, 0), build_base_model(family, 0), build_base_model(family, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[layer_param(family, 0, "up")], sc[layer_param(family, 0, "up")])
    biases = [v for k, v in sa.items() if k.endswith("bias")]
    assert all(v.abs().min() > 0 for v in biases)
    assert len(biases) > 0 or family in ("llama", "mistral")
    assert a.config._attn_implementation == "eager"


def test_tiny_llama_is_gqa() -> None:
    cfg = tiny_config("llama")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 8)
    state = build_base_model("qwen2").state_dict()
    assert state[layer_param("qwen2", 0, "k")].shape == (32, 64)
    assert layer_param("qwen2", 0, "v", "bias") in state


def test_write_is_byte_deterministic(tmp_path) -> None:
    one = write_model_dir(tmp_path / "a", "llama", seed=3)
    two = write_model_dir(tmp_path / "b", "llama", seed=3)
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()


def test_mask_forms_store_the_same_effective_weights(tmp_path) -> None:
    name = layer_param("bert", 0, "up")
    masks = {name: row_mask((128, 64), [0, 5, 7])}
    file_dir = write_model_dir(tmp_path / "file", "bert", masks=masks, mask_form="file")
    prune_dir = write_model_dir(tmp_path / "prune", "bert", masks=masks, mask_form="torch_prune")
    zeros_dir = write_model_dir(tmp_path / "zeros", "bert", masks=masks, mask_form="zeros")
    base = load_file(file_dir / "model.safetensors")
    stored_masks = load_file(file_dir / "pruning_masks.safetensors")
    pruned = load_file(prune_dir / "model.safetensors")
    zeros = load_file(zeros_dir / "model.safetensors")
    expected = base[name] * stored_masks[name]
    assert name not in pruned
    assert torch.equal(pruned[name + "_orig"], base[name])
    assert torch.equal(pruned[name + "_orig"] * pruned[name + "_mask"], expected)
    assert torch.equal(zeros[name], expected)
    assert int((expected.abs().sum(dim=1) == 0).sum()) == 3
    assert not (zeros_dir / "pruning_masks.safetensors").exists()


def test_shards_cover_the_state_dict(tmp_path) -> None:
    whole = load_file(write_model_dir(tmp_path / "one", "qwen2") / "model.safetensors")
    sharded = write_model_dir(tmp_path / "three", "qwen2", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3
    merged = {k: v for f in files for k, v in load_file(sharded / f).items()}
    assert merged.keys() == whole.keys() == index["weight_map"].keys()
    assert all(torch.equal(merged[k], whole[k]) for k in whole)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_is_peft_lora_with_nonzero_a_and_b(tmp_path, family: str) -> None:
    spec = LoraSpec(TARGETS[family], r=2, lora_alpha=4, use_rslora=True)
    path = write_model_dir(tmp_path, family, lora=spec)
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == (
        "LORA",
        2,
        4,
        True,
    )
    tensors = load_file(path / "adapter" / "adapter_model.safetensors")
    layers = tiny_config(family).num_hidden_layers
    assert len(tensors) == 2 * len(TARGETS[family]) * layers
    assert all(t.abs().min() > 0 or t.abs().max() > 0 for t in tensors.values())
    assert all(t.abs().sum() > 0 for t in tensors.values())


def test_tokenizer_is_written_and_loads(tmp_path) -> None:
    from transformers import AutoTokenizer

    path = write_model_dir(tmp_path, "bert", tokenizer=True)
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok(["hello world."])["input_ids"][0]
    assert len(tok) == 128 and max(ids) < 128 and tok.unk_token_id not in ids


def test_mask_helpers() -> None:
    assert row_mask((6, 4), [1]).flatten().tolist() == [1, 0, 1, 1, 1, 1]
    cols = head_column_mask((4, 8), [1], head_dim=2)
    assert cols.shape == (1, 8) and cols.flatten().tolist() == [1, 1, 0, 0, 1, 1, 1, 1]
    assert head_row_mask((8, 4), [0, 3], 2).flatten().tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    group = gqa_group_masks(tiny_config("llama"), "llama", 1, kv_head=2)
    o, v = group[layer_param("llama", 1, "o")], group[layer_param("llama", 1, "v")]
    assert torch.nonzero(o[0] == 0).flatten().tolist() == list(range(32, 48))  # query heads 4 and 5
    assert torch.nonzero(v[:, 0] == 0).flatten().tolist() == list(range(16, 24))


@pytest.mark.slow
def test_minilm_demo_dir(minilm_demo_dir) -> None:
    masks = load_file(minilm_demo_dir / "pruning_masks.safetensors")
    assert len(masks) == 12
    for i in range(6):
        up = masks[layer_param("bert", i, "up")]
        out = masks[layer_param("bert", i, "o")]
        assert up.shape == (1536, 1) and int((up == 0).sum()) == 768
        assert out.shape == (1, 384) and int((out == 0).sum()) == 4 * 32
    adapter = json.loads((minilm_demo_dir / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (
        8,
        16,
        ["query", "value"],
    )
    for name in ("tokenizer.json", "modules.json", "1_Pooling/config.json", "config.json"):
        assert (minilm_demo_dir / name).exists()


def test_refuses_a_non_empty_folder(tmp_path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_model_dir(tmp_path, "bert")
