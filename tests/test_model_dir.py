"""load_model_dir + build_reference_model: every form of input gives the same reference; bad input is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export_errors import InputError
from exporter.model_dir.loader import SUPPORTED_MODEL_TYPES, build_reference_model, load_model_dir
from exporter.model_dir.masks import MASKS_FILE
from exporter.model_dir.pooling import Pooling
from exporter.testing.synthetic import (
    LoraSpec,
    gqa_group_masks,
    head_column_mask,
    head_row_mask,
    layer_param,
    row_mask,
    tiny_config,
    write_model_dir,
)

TARGETS = {
    "bert": ("query", "value", "intermediate.dense"),
    "llama": ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"),
    "qwen2": ("k_proj", "v_proj", "up_proj"),
}


def family_masks(family: str) -> dict[str, torch.Tensor]:
    """Rows with biases kept, head columns, value rows, gate/up rows and (decoders) a whole GQA group."""
    cfg = tiny_config(family)
    if family == "bert":
        return {
            layer_param("bert", 0, "up"): row_mask((128, 64), [0, 3, 9]),
            layer_param("bert", 0, "o"): head_column_mask((64, 64), [1], 16),
            layer_param("bert", 1, "v"): head_row_mask((64, 64), [2], 16),
        }
    masks = gqa_group_masks(cfg, family, 0, kv_head=1)
    masks[layer_param(family, 1, "gate")] = row_mask((96, 64), [1, 2])
    masks[layer_param(family, 1, "up")] = row_mask((96, 64), [5]).to(torch.bool)
    masks[layer_param(family, 1, "v")] = head_row_mask((32, 64), [3], 8).to(torch.uint8)
    return masks


def reference_state(path: Path, **kwargs) -> dict[str, torch.Tensor]:
    return build_reference_model(load_model_dir(path, **kwargs)).state_dict()


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff == 0.0, f"{name}: max abs difference {diff}"


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_every_mask_form_gives_the_same_reference(tmp_path, family: str) -> None:
    masks, lora = family_masks(family), LoraSpec(TARGETS[family])
    states = {}
    for form in ("file", "torch_prune", "zeros"):
        path = write_model_dir(tmp_path / form, family, masks=masks, mask_form=form, lora=lora)
        md = load_model_dir(path)
        assert md.mask_source == {"file": MASKS_FILE, "torch_prune": "torch.nn.utils.prune"}.get(
            form, "zeros-in-weights"
        )
        assert set(md.masks) == set(masks)
        states[form] = build_reference_model(md).state_dict()
    assert_same_state(states["file"], states["torch_prune"])
    assert_same_state(states["file"], states["zeros"])
    for name, mask in masks.items():  # masked entries are zero after the merge
        assert (states["file"][name][torch.broadcast_to(mask, states["file"][name].shape) == 0] == 0).all()


def test_masks_apply_after_the_merge(tmp_path) -> None:
    name = layer_param("bert", 0, "v")
    path = write_model_dir(tmp_path, "bert", masks={name: row_mask((64, 64), [4])}, lora=LoraSpec(("value",)))
    merged_only = build_reference_model(load_model_dir(path))
    base = load_file(path / "model.safetensors")[name]
    weight = merged_only.state_dict()[name]
    assert (weight[4] == 0).all()
    assert (weight[5] - base[5]).abs().max() > 1e-3  # LoRA changed the live rows


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_sharded_equals_unsharded(tmp_path, family: str) -> None:
    kwargs = {"masks": family_masks(family), "lora": LoraSpec(TARGETS[family])}
    one = write_model_dir(tmp_path / "one", family, **kwargs)
    three = write_model_dir(tmp_path / "three", family, shards=3, **kwargs)
    assert not (three / "model.safetensors").exists()
    assert_same_state(reference_state(one), reference_state(three))


def test_checkpoint_prefix_is_accepted(tmp_path) -> None:
    """A BertForSequenceClassification-style folder: "bert." prefixes, a classifier head, prefixed mask
    names and adapter keys. It loads to the same reference as the plain folder."""
    masks = family_masks("bert")
    plain = write_model_dir(tmp_path / "plain", "bert", masks=masks, lora=LoraSpec(("query",)))
    prefixed = tmp_path / "prefixed"
    shutil.copytree(plain, prefixed)
    weights = {f"bert.{k}": v for k, v in load_file(plain / "model.safetensors").items()}
    weights["classifier.weight"] = torch.ones(2, 64)
    save_file(weights, str(prefixed / "model.safetensors"))
    save_file({f"bert.{k}": v.contiguous() for k, v in masks.items()}, str(prefixed / MASKS_FILE))
    adapter = prefixed / "adapter" / "adapter_model.safetensors"
    renamed = {
        k.replace("base_model.model.", "base_model.model.bert."): v for k, v in load_file(adapter).items()
    }
    save_file(renamed, str(adapter))
    md = load_model_dir(prefixed)
    assert md.ignored_tensors == ["classifier.weight"]
    assert_same_state(reference_state(plain), build_reference_model(md).state_dict())
    assert md.lora_merge is not None and len(md.lora_merge.merged_modules) == 2


def test_tied_embeddings_without_lm_head(tmp_path) -> None:
    path = write_model_dir(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, str(path / "model.safetensors"))
    model = build_reference_model(load_model_dir(path))
    assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])


def test_explicit_adapter_path_and_extras(tmp_path) -> None:
    source = write_model_dir(tmp_path / "with", "bert", lora=LoraSpec(("query",)), tokenizer=True)
    bare = write_model_dir(tmp_path / "bare", "bert")
    assert load_model_dir(bare).adapter_path is None
    md = load_model_dir(bare, adapter=source / "adapter")
    assert md.adapter_path == source / "adapter" and md.tokenizer_path is None and md.mask_source == "none"
    assert load_model_dir(source).tokenizer_path == source
    (bare / "modules.json").write_text(
        json.dumps([{"type": "x.Transformer"}, {"type": "x.Pooling", "path": "p"}])
    )
    (bare / "p").mkdir()
    (bare / "p" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert load_model_dir(bare).pooling == Pooling(mode="cls", normalize=False)


def test_pickle_only_with_the_flag(tmp_path) -> None:
    path = write_model_dir(tmp_path / "st", "bert", masks=family_masks("bert"))
    pickled = tmp_path / "pickled"
    shutil.copytree(path, pickled)
    torch.save(load_file(path / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(InputError, match="allow-pickle") as info:
        load_model_dir(pickled)
    assert info.value.where == str(pickled / "pytorch_model.bin")
    assert_same_state(reference_state(path), reference_state(pickled, allow_pickle=True))


@pytest.mark.slow
def test_minilm_demo_reference(minilm_demo_dir) -> None:
    md = load_model_dir(minilm_demo_dir)
    assert (md.model_type, md.mask_source, len(md.masks)) == ("bert", MASKS_FILE, 12)
    assert md.pooling == Pooling(mode="mean", normalize=True)
    assert md.tokenizer_path == minilm_demo_dir
    assert set(md.ignored_tensors) == {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    model = build_reference_model(md)
    assert md.lora_merge is not None and len(md.lora_merge.merged_modules) == 12
    up = model.state_dict()[layer_param("bert", 0, "up")]
    assert int((up.abs().sum(dim=1) == 0).sum()) == 768


# ------------------------------------------------------------------------------------------ bad input


def refused(path: Path, where: Path | str, *words: str, **kwargs) -> InputError:
    with pytest.raises(InputError) as info:
        load_model_dir(path, **kwargs)
    assert info.value.where == str(where), info.value
    for word in words:
        assert word in info.value.problem, info.value
    return info.value


@pytest.fixture
def bert_dir(tmp_path) -> Path:
    return write_model_dir(tmp_path / "m", "bert", lora=LoraSpec(("query", "value")))


def test_missing_config(bert_dir) -> None:
    (bert_dir / "config.json").unlink()
    refused(bert_dir, bert_dir / "config.json", "missing")


def test_unparseable_config(bert_dir) -> None:
    (bert_dir / "config.json").write_text("{ not json")
    refused(bert_dir, bert_dir / "config.json", "not valid JSON")


def test_unsupported_model_type(bert_dir) -> None:
    (bert_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    error = refused(bert_dir, bert_dir / "config.json", "'gpt2'")
    assert all(t in error.problem for t in SUPPORTED_MODEL_TYPES)


def test_missing_weights(bert_dir) -> None:
    (bert_dir / "model.safetensors").unlink()
    refused(bert_dir, bert_dir, "no weights")


def test_missing_shard(tmp_path) -> None:
    path = write_model_dir(tmp_path, "bert", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    refused(path, path / "model-00002-of-00002.safetensors", "missing")


def test_truncated_safetensors(bert_dir) -> None:
    file = bert_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    refused(bert_dir, file, "cannot read safetensors")


def test_corrupt_safetensors(bert_dir) -> None:
    file = bert_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    file.write_bytes(bytes(data))
    refused(bert_dir, file, "cannot read safetensors")


def test_weight_of_the_wrong_shape(bert_dir) -> None:
    weights = load_file(bert_dir / "model.safetensors")
    weights[layer_param("bert", 0, "up")] = torch.zeros(100, 64)
    save_file(weights, str(bert_dir / "model.safetensors"))
    refused(bert_dir, bert_dir / "model.safetensors", layer_param("bert", 0, "up"), "[100, 64]", "[128, 64]")


def test_missing_tensor(bert_dir) -> None:
    weights = load_file(bert_dir / "model.safetensors")
    del weights[layer_param("bert", 1, "down")]
    save_file(weights, str(bert_dir / "model.safetensors"))
    refused(bert_dir, bert_dir / "model.safetensors", layer_param("bert", 1, "down"), "missing")


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (torch.ones(64, 1), ["shape [64, 1]", "[128, 64]"]),
        (torch.full((128, 1), 0.5), ["other than 0/1", "0.5"]),
        (torch.tensor([[float("nan")]] * 128), ["NaN"]),
    ],
)
def test_bad_mask(bert_dir, mask: torch.Tensor, words: list[str]) -> None:
    name = layer_param("bert", 0, "up")
    save_file({name: mask}, str(bert_dir / MASKS_FILE))
    refused(bert_dir, bert_dir / MASKS_FILE, name, *words)


def test_mask_naming_no_parameter(bert_dir) -> None:
    save_file({"encoder.layer.7.intermediate.dense.weight": torch.ones(128, 1)}, str(bert_dir / MASKS_FILE))
    refused(
        bert_dir, bert_dir / MASKS_FILE, "encoder.layer.7.intermediate.dense.weight", "names no parameter"
    )


def test_prune_pair_without_its_mask(tmp_path) -> None:
    name = layer_param("bert", 0, "up")
    path = write_model_dir(tmp_path, "bert", masks={name: row_mask((128, 64), [1])}, mask_form="torch_prune")
    weights = load_file(path / "model.safetensors")
    del weights[name + "_mask"]
    save_file(weights, str(path / "model.safetensors"))
    refused(path, path / "model.safetensors", name + "_orig", "no matching")


def test_bad_prune_mask_values(tmp_path) -> None:
    name = layer_param("bert", 0, "up")
    path = write_model_dir(tmp_path, "bert", masks={name: row_mask((128, 64), [1])}, mask_form="torch_prune")
    weights = load_file(path / "model.safetensors")
    weights[name + "_mask"][0, 0] = 2.0
    save_file(weights, str(path / "model.safetensors"))
    refused(path, path / "model.safetensors", name + "_mask", "other than 0/1")


def test_adapter_of_the_wrong_shape(bert_dir) -> None:
    file = bert_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    tensors[key] = torch.zeros(4, 32)
    save_file(tensors, str(file))
    refused(bert_dir, file, key, "[4, 32]", "Linear(64 -> 64) with r=4", "[4, 64]")


def test_adapter_for_modules_the_model_lacks(bert_dir) -> None:
    config_file = bert_dir / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["query", "q_proj"]
    config_file.write_text(json.dumps(config))
    refused(bert_dir, config_file, "['q_proj']", "match no module")


def test_adapter_tensor_for_a_missing_module(bert_dir) -> None:
    file = bert_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.encoder.layer.5.attention.self.query.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(file))
    refused(bert_dir, file, "encoder.layer.5.attention.self.query", "no module")


def test_adapter_that_is_not_lora(bert_dir) -> None:
    config_file = bert_dir / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["peft_type"] = "IA3"
    config_file.write_text(json.dumps(config))
    refused(bert_dir, config_file, "'IA3'", "not 'LORA'")


def test_adapter_without_config(bert_dir) -> None:
    (bert_dir / "adapter" / "adapter_config.json").unlink()
    refused(bert_dir, bert_dir / "adapter" / "adapter_config.json", "missing")


def test_adapter_argument_that_does_not_exist(bert_dir, tmp_path) -> None:
    refused(bert_dir, tmp_path / "nowhere", "not found", adapter=tmp_path / "nowhere")


def test_adapter_rank_differs_from_its_config(bert_dir) -> None:
    file = bert_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    tensors[key] = torch.zeros(64, 3)
    save_file(tensors, str(file))
    refused(bert_dir, file, key, "[64, 3]", "r=4", "[64, 4]")


def test_adapter_tensor_for_an_untargeted_module(bert_dir) -> None:
    file = bert_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.encoder.layer.0.attention.self.key.lora_A.weight"
    tensors[key] = torch.ones(4, 64)
    save_file(tensors, str(file))
    refused(bert_dir, file, key, "not selected by target_modules")


def test_corrupt_pickle_with_the_flag(bert_dir) -> None:
    (bert_dir / "model.safetensors").unlink()
    (bert_dir / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    refused(bert_dir, bert_dir / "pytorch_model.bin", "weights_only", allow_pickle=True)


def test_inconsistent_config(bert_dir) -> None:
    config = json.loads((bert_dir / "config.json").read_text())
    config["hidden_size"] = 63
    (bert_dir / "config.json").write_text(json.dumps(config))
    refused(bert_dir, bert_dir / "config.json", "cannot build a bert model")


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_reference_matches_transformers_own_loader(tmp_path, family: str) -> None:
    """Without masks or adapter the reference is exactly the model transformers loads from the folder
    (buffers such as rotary frequencies included, which a state-dict comparison would not see)."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = write_model_dir(tmp_path, family)
    ours = build_reference_model(load_model_dir(path))
    if family == "bert":
        theirs = AutoModel.from_pretrained(str(path), add_pooling_layer=False, attn_implementation="eager")
    else:
        theirs = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        a, b = (
            ours(input_ids=ids, attention_mask=mask)[0],
            theirs.eval()(input_ids=ids, attention_mask=mask)[0],
        )
    assert a.abs().max() > 0.1
    assert torch.equal(a, b), f"max abs difference {(a - b).abs().max().item()}"


@pytest.mark.parametrize("model_type", ["roberta", "mistral"])
def test_other_supported_types_saved_by_transformers(tmp_path, model_type: str) -> None:
    """Folders written by transformers' save_pretrained from a model with a head (RobertaForMaskedLM:
    "roberta." prefix and lm_head tensors; MistralForCausalLM) load to transformers' own model. RobertaForMaskedLM
    is a fill-mask model (tests/test_tasks.py); exported as feature-extraction, its lm_head is ignored."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    shape = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 48, "num_hidden_layers": 1}
    if model_type == "mistral":
        shape["num_key_value_heads"] = 2
    config = AutoConfig.for_model(model_type, vocab_size=100, **shape)
    torch.manual_seed(0)
    head_class = AutoModelForMaskedLM if model_type == "roberta" else AutoModelForCausalLM
    head_class.from_config(config).save_pretrained(str(tmp_path))
    md = load_model_dir(tmp_path, task="feature-extraction" if model_type == "roberta" else None)
    ours = build_reference_model(md)
    if model_type == "roberta":
        assert md.ignored_tensors and all(n.startswith("lm_head.") for n in md.ignored_tensors)
        theirs = AutoModel.from_pretrained(
            str(tmp_path), add_pooling_layer=False, attn_implementation="eager"
        )
    else:
        theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids)[0], theirs.eval()(input_ids=ids)[0]
    assert torch.equal(a, b), f"max abs difference {(a - b).abs().max().item()}"


def test_model_dir_that_is_not_a_folder(tmp_path) -> None:
    refused(tmp_path / "absent", tmp_path / "absent", "not found")
