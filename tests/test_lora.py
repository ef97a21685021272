"""The LoRA merge is PEFT's, with its scaling rules, checked against a hand computation; lost
LoRA tensors (peft #1746) are an error, not a warning."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from export_errors import InputError
from exporter.model_dir.loader import build_reference_model, load_model_dir, new_model
from exporter.model_dir.lora import merge_lora, read_adapter
from exporter.testing.synthetic import LoraSpec, head_row_mask, layer_param, row_mask, write_model_dir

PEFT = "base_model.model."


def lora_delta(path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of one module, read from the adapter file."""
    tensors = load_file(path / "adapter" / "adapter_model.safetensors")
    return tensors[f"{PEFT}{module}.lora_B.weight"], tensors[f"{PEFT}{module}.lora_A.weight"]


def assert_hand_merge(path, family: str, role: str, scaling: float, layer: int = 1) -> None:
    module = layer_param(family, layer, role).removesuffix(".weight")
    base = load_file(path / "model.safetensors")[module + ".weight"]
    b, a = lora_delta(path, module)
    merged = build_reference_model(load_model_dir(path)).state_dict()[module + ".weight"]
    expected = base + scaling * (b @ a)
    error = (merged - expected).abs().max().item()
    assert error < 1e-6, f"{module}: max abs error {error} vs W + {scaling}·B·A"
    assert (merged - base).abs().max().item() > 1e-2


def test_merge_is_w_plus_alpha_over_r_ba(tmp_path) -> None:
    path = write_model_dir(tmp_path, "bert", lora=LoraSpec(("query", "value"), r=4, lora_alpha=8))
    assert_hand_merge(path, "bert", "v", 8 / 4)


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path) -> None:
    path = write_model_dir(tmp_path, "qwen2", lora=LoraSpec(("v_proj",), r=4, lora_alpha=8, use_rslora=True))
    assert_hand_merge(path, "qwen2", "v", 8 / 4**0.5)


def test_rank_and_alpha_patterns(tmp_path) -> None:
    spec = LoraSpec(
        ("q_proj", "down_proj"),
        r=4,
        lora_alpha=8,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 6},
    )
    path = write_model_dir(tmp_path, "llama", lora=spec)
    assert_hand_merge(path, "llama", "q", 8 / 4)
    assert_hand_merge(path, "llama", "down", 6 / 2)


def test_zero_adapter_changes_nothing(tmp_path) -> None:
    with_adapter = write_model_dir(tmp_path / "a", "bert", lora=LoraSpec(("query",), b_std=0.0))
    md = load_model_dir(with_adapter)
    merged = build_reference_model(md).state_dict()
    base = load_file(with_adapter / "model.safetensors")
    assert md.lora_merge is not None and md.lora_merge.max_abs_delta == 0.0
    assert all(torch.equal(merged[k], base[k]) for k in base)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_adapter_on_an_already_masked_base_keeps_its_lora(tmp_path, family: str) -> None:
    """peft #1746: an adapter loaded onto a pruned base silently lost its LoRA tensors. Here the
    base carries torch.nn.utils.prune pairs; every targeted module must be merged and changed."""
    targets = ("query", "value") if family == "bert" else ("v_proj", "up_proj")
    masks = (
        {layer_param("bert", 0, "v"): head_row_mask((64, 64), [1], 16)}
        if family == "bert"
        else {
            layer_param(family, 0, "v"): head_row_mask((32, 64), [1], 8),
            layer_param(family, 1, "up"): row_mask((96, 64), [3]),
        }
    )
    path = write_model_dir(tmp_path, family, masks=masks, mask_form="torch_prune", lora=LoraSpec(targets))
    md = load_model_dir(path)
    model = build_reference_model(md)
    assert md.lora_merge is not None
    assert len(md.lora_merge.merged_modules) == 2 * len(targets)  # 2 layers
    base = load_file(path / "model.safetensors")
    merged = model.state_dict()
    for module in md.lora_merge.merged_modules:
        name = module + ".weight"
        stored = base.get(name, base.get(name + "_orig"))
        mask = torch.broadcast_to(masks.get(name, torch.ones(1)), stored.shape).bool()
        assert (merged[name][mask] - stored[mask]).abs().min() > 0, f"{module}: LoRA not merged"
        assert (merged[name][~mask] == 0).all(), f"{module}: masked entries revived by the merge"


def test_lost_lora_tensors_are_an_error(tmp_path) -> None:
    """A LoRA tensor PEFT does not load (here: for a module the config does not target) fails the merge."""
    path = write_model_dir(tmp_path, "bert", lora=LoraSpec(("query",)))
    md = load_model_dir(path)
    adapter = read_adapter(path / "adapter")
    adapter.tensors[f"{PEFT}encoder.layer.0.attention.self.key.lora_A.weight"] = torch.ones(4, 64)
    model = new_model(md.config)
    model.load_state_dict(md.weights)
    with pytest.raises(InputError, match="did not load") as info:
        merge_lora(model, adapter)
    assert info.value.where == str(path / "adapter" / "adapter_model.safetensors")
