"""Decoder-with-past export of tiny Llama-GQA / Qwen2 models pruned to different widths per layer.

The reference is the PyTorch model's full-sequence forward (no cache): the ONNX prefill followed by
token-by-token decoding with its own cache must reproduce it at every step to the fp32 tolerance.
`build_pruned_model` is shared with test_generation.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from export_errors import InputError
from exporter.export.decoder_with_past import (
    DecoderManifest,
    LayerAttentionShape,
    export_decoder_with_past,
    layer_attention_shapes,
    tensorrt_profile,
)
from exporter.runtime.generation import CachedDecoder
from exporter.validate.tolerances import tolerance

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
# layer -> (kv heads kept, query heads kept per kv head); 8 q / 4 kv heads, 2 q per kv before pruning.
PRUNING = {1: ([0, 2, 3], 2), 2: ([0, 1, 2, 3], 1)}  # layer 1 lost KV group 1 (6q/3kv); layer 2: 4q/4kv


def slice_heads(attn: nn.Module, keep_kv: list[int], q_per_kv: int) -> None:
    """Keep KV heads `keep_kv` and the first `q_per_kv` query heads of each one's group: rows of
    q/k/v (weights and biases), columns of o_proj; update `num_key_value_groups`."""
    hd, groups = attn.head_dim, attn.num_key_value_groups
    keep_q = [kv * groups + j for kv in keep_kv for j in range(q_per_kv)]

    def rows(heads: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])

    def sliced(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
        weight = linear.weight.index_select(dim, index)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
        new.weight.data.copy_(weight)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias if dim == 1 else linear.bias[index])
        return new

    attn.q_proj = sliced(attn.q_proj, rows(keep_q), 0)
    attn.k_proj = sliced(attn.k_proj, rows(keep_kv), 0)
    attn.v_proj = sliced(attn.v_proj, rows(keep_kv), 0)
    attn.o_proj = sliced(attn.o_proj, rows(keep_q), 1)
    attn.num_key_value_groups = q_per_kv


def build_pruned_model(family: str, *, seed: int = 0, pruning: dict | None = None) -> nn.Module:
    """Tiny seeded model (hidden 64, 8 q / 4 kv heads of 8, 3 layers, vocab 128), layers pruned per `PRUNING`."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        num_hidden_layers=3,
        vocab_size=128,
        max_position_embeddings=256,
        initializer_range=0.2,  # peaked logits: greedy tokens vary instead of repeating one token
        attn_implementation="eager",
    )
    model = model_cls(config).eval()
    for layer, (keep_kv, q_per_kv) in (PRUNING if pruning is None else pruning).items():
        slice_heads(model.model.layers[layer].self_attn, keep_kv, q_per_kv)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory):
    model = build_pruned_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "decoder_model.onnx"
    manifest = export_decoder_with_past(model, path)
    return model, path, manifest


def reference_session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    error = np.abs(got - want)
    where = np.unravel_index(int(error.argmax()), error.shape)
    assert error.max() <= tolerance("fp32").max_abs, f"{what}: max abs error {error.max():.3e} at {where}"


def test_manifest_records_per_layer_widths_as_pruned(exported):
    model, _, manifest = exported
    assert manifest.layers == (
        LayerAttentionShape(n_q=8, n_kv=4, head_dim=8),
        LayerAttentionShape(n_q=6, n_kv=3, head_dim=8),
        LayerAttentionShape(n_q=4, n_kv=4, head_dim=8),
    )
    assert model.config.num_key_value_heads == 4  # config.json still says the original count
    json.dumps(manifest.to_dict())


def test_onnx_io_names_and_axes(exported):
    _, path, manifest = exported
    graph = onnx.load(str(path), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(3) for kv in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(3) for kv in ("key", "value")
    ]
    assert list(manifest.input_names) == names
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["past_key_values.1.key"] == ["batch_size", 3, "past_sequence_length", 8]
    assert dims["past_key_values.2.value"] == ["batch_size", 4, "past_sequence_length", 8]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]


@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_then_cached_decode_matches_full_sequence(exported, batch):
    model, path, _ = exported
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 128, (batch, 14), dtype=np.int64)
    with torch.no_grad():
        full = model(torch.from_numpy(tokens), use_cache=False).logits.numpy()
    decoder = CachedDecoder(reference_session(path))
    decoder.reset(batch)
    prompt = 5
    assert_close(decoder.forward(tokens[:, :prompt]), full[:, :prompt], "prefill logits")
    for t in range(prompt, tokens.shape[1]):
        assert_close(decoder.forward(tokens[:, t : t + 1])[:, 0], full[:, t], f"decode step at position {t}")


def test_left_padded_batch_matches_unpadded_rows(exported):
    """Row 0 carries 3 pad tokens on the left: its logits must equal those of the unpadded prompt."""
    model, path, _ = exported
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 128, (2, 10), dtype=np.int64)
    mask = np.ones_like(tokens)
    mask[0, :3] = 0
    with torch.no_grad():
        short = model(torch.from_numpy(tokens[:1, 3:]), use_cache=False).logits.numpy()
    decoder = CachedDecoder(reference_session(path))
    decoder.reset(2, mask[:, :6])
    logits = [decoder.forward(tokens[:, :6])[:1, 3:]]
    logits += [decoder.forward(tokens[:, t : t + 1])[:1] for t in range(6, 10)]
    assert_close(np.concatenate(logits, axis=1), short, "left-padded row")


def test_mistral_exports_too(tmp_path):
    model = build_pruned_model("mistral")
    manifest = export_decoder_with_past(model, tmp_path / "m.onnx")
    assert [layer.n_kv for layer in manifest.layers] == [4, 3, 4]


def test_inconsistent_groups_are_refused():
    model = build_pruned_model("llama", pruning={})
    model.model.layers[0].self_attn.k_proj = nn.Linear(64, 16, bias=False)  # 2 kv heads, groups still 2
    model.model.layers[0].self_attn.v_proj = nn.Linear(64, 16, bias=False)
    with pytest.raises(InputError, match=r"model\.layers\.0\.self_attn.*num_key_value_groups"):
        layer_attention_shapes(model)


def test_unsupported_family_names_the_supported_ones():
    model = build_pruned_model("llama", pruning={})
    model.config.model_type = "gpt2"
    with pytest.raises(InputError, match="supported: llama, mistral, qwen2"):
        layer_attention_shapes(model)


def test_tensorrt_profile_covers_prefill_and_decode():
    layers = (LayerAttentionShape(8, 4, 8), LayerAttentionShape(6, 3, 8))
    manifest = DecoderManifest(
        layers, (), (), {}, vocab_size=128, dtype="float32", opset=17, model_type="llama"
    )
    profile = tensorrt_profile(manifest, max_batch=4, max_prompt=64, max_total=256)
    assert profile["min"]["input_ids"] == (1, 1)
    assert profile["max"]["input_ids"] == (4, 64)
    assert profile["min"]["past_key_values.1.key"] == (1, 3, 0, 8)
    assert profile["opt"]["past_key_values.0.value"] == (4, 4, 128, 8)
    assert profile["max"]["past_key_values.1.value"] == (4, 3, 255, 8)
    assert profile["max"]["attention_mask"] == (4, 256)
    for level in ("min", "opt"):
        for name, shape in profile[level].items():
            assert all(a <= b for a, b in zip(shape, profile["max"][name])), name
    decode = tensorrt_profile(manifest, max_batch=4, max_prompt=64, max_total=256, phase="decode")
    assert decode["max"]["input_ids"] == (4, 1)
    with pytest.raises(InputError, match="max_prompt <= max_total"):
        tensorrt_profile(manifest, max_batch=1, max_prompt=300, max_total=256)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_restructured_masked_model_matches_masked_reference(family, tmp_path):
    """The issue's reference: a masked model (dead KV group by zero o_proj columns in layer 1, a zero
    value head in layer 2) made compact by `restructure`, exported with the cache, decoded step by step."""
    from exporter.restructure.remove_dead import restructure

    masked = build_pruned_model(family, pruning={})
    with torch.no_grad():
        masked.model.layers[1].self_attn.o_proj.weight[:, 16:32] = 0  # query heads 2, 3 = KV group 1
        masked.model.layers[2].self_attn.v_proj.weight[:8] = 0  # KV head 0's values (qwen2: bias folded)
    compact = copy.deepcopy(masked)
    restructure(compact)
    manifest = export_decoder_with_past(compact, tmp_path / "decoder_model.onnx")
    assert [(layer.n_q, layer.n_kv) for layer in manifest.layers] == [(8, 4), (6, 3), (6, 3)]
    tokens = np.random.default_rng(6).integers(0, 128, (2, 12), dtype=np.int64)
    with torch.no_grad():
        full = masked(torch.from_numpy(tokens), use_cache=False).logits.numpy()
    decoder = CachedDecoder(reference_session(tmp_path / "decoder_model.onnx"))
    decoder.reset(2)
    assert_close(decoder.forward(tokens[:, :4]), full[:, :4], "prefill logits")
    for t in range(4, 12):
        assert_close(decoder.forward(tokens[:, t : t + 1])[:, 0], full[:, t], f"decode step at position {t}")
