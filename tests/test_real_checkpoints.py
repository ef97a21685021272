"""Folders shaped like real Llama / Mistral checkpoints: tokenizers without a pad token, bf16 / fp16
shards, generation_config.json, tied embeddings, rope_scaling and Mistral's sliding window.

Tokenizers are trained here with the `tokenizers` library and saved with transformers'
PreTrainedTokenizerFast (exporter/testing/synthetic.py), so the folders hold what users' folders hold.
Every rope / window variant is checked against transformers itself: its own `generate` with its own
cache (prefill of a left-padded batch + 16 greedy decode steps), logits compared at every step.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export_errors import InputError
from exporter import ExportConfig, export_engine
from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.export.rope import StatelessDynamicRotary, traceable_rotary
from exporter.model_dir.loader import build_reference_model, load_model_dir
from exporter.model_dir.tokenizer import padding_choice, tokenize
from exporter.runtime.generation import CachedDecoder
from exporter.testing.synthetic import LoraSpec, build_base_model, column_mask, layer_param, row_mask
from exporter.validate.tolerances import tolerance
from graph_passes.pipeline import optimize

TOL = tolerance("fp32").max_abs
STEPS = 16


def test_padding_choice_prefers_pad_then_eos_then_unk() -> None:
    assert padding_choice({"pad_token": "<pad>", "eos_token": "</s>"}) == ("<pad>", "pad_token")
    assert padding_choice({"pad_token": None, "eos_token": "</s>", "unk_token": "<unk>"}) == (
        "</s>",
        "eos_token",
    )
    assert padding_choice({"unk_token": "<unk>"}) == ("<unk>", "unk_token")
    assert padding_choice({"pad_token": None}) is None


@pytest.mark.parametrize(("style", "eos"), [("llama3", "<|end_of_text|>"), ("sentencepiece", "</s>")])
def test_text_without_a_pad_token_is_padded_with_eos_on_the_generation_side(tmp_path, style, eos) -> None:
    from exporter.testing.synthetic import write_real_style_tokenizer

    write_real_style_tokenizer(tmp_path, style, 384)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "pad_token" not in config and config["eos_token"] == eos  # as the Llama / Mistral folders ship
    texts = ["Short.", "A much longer sentence that needs more tokens than the first one."]
    feeds = tokenize(texts, tmp_path, ["input_ids", "attention_mask"], 24, padding_side="left")
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(str(tmp_path)).convert_tokens_to_ids(eos)
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # left padded
    assert (ids[mask == 0] == eos_id).all()
    assert (ids[:, -1] != eos_id).all()  # the eos id only where it is masked out


def test_a_tokenizer_without_pad_eos_or_unk_is_an_input_error(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(tmp_path))
    with pytest.raises(InputError, match="no pad, eos or unk token"):
        tokenize(["a b", "a"], tmp_path, ["input_ids", "attention_mask"], 4)


@pytest.mark.parametrize(("family", "style"), [("llama", "llama3"), ("mistral", "sentencepiece")])
def test_real_style_folder_exports_with_text_calibration(model_dir_factory, tmp_path, family, style) -> None:
    """The issue's "done when": a folder whose tokenizer has no pad token exports with the default INT8
    and text calibration (the shipped English corpus); generation_config.json is carried over."""
    masks = {
        layer_param(family, 0, "up"): row_mask((96, 64), range(20)),
        layer_param(family, 1, "o"): column_mask((64, 64), range(16)),  # query heads 0, 1 = KV group 0
    }
    src = model_dir_factory(
        family,
        tokenizer=style,
        generation_config=True,
        masks=masks,
        lora=LoraSpec(("q_proj", "v_proj")),
        config_overrides={"tie_word_embeddings": family == "llama"},  # Llama 3.2 1B / 3B tie them
    )
    result = export_engine(src, tmp_path / "out", ExportConfig(benchmark=False, calibration_samples=32))
    report = result.report
    assert report["model"]["tokenizer_padding"]["source"] == "eos_token"
    assert report["model"]["tokenizer_padding"]["side"] == "left"
    assert report["int8"]["calibration"]["source"].startswith("default English corpus")
    assert {"int8", "int8_cpu", "generation_config"} <= set(result.artifacts)
    carried = json.loads(result.artifacts["generation_config"].read_text())
    assert carried == json.loads((src / "generation_config.json").read_text())
    assert (result.output_dir / "compact_model" / "generation_config.json").is_file()
    for stage in ("compact_pytorch", "onnx_fp32", "optimized_fp32"):
        assert report["validation"][stage][0]["max_abs"] <= TOL, stage


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_shards_are_read_in_their_dtype(model_dir_factory, tmp_path, dtype) -> None:
    """Shards stay in their dtype when read (no fp32 copy of the checkpoint); the reference upcasts
    into the fp32 model it is built in, and the export matches it."""
    src = model_dir_factory(
        "llama",
        dtype=dtype,
        shards=2,
        masks={layer_param("llama", 1, "gate"): row_mask((96, 64), range(30))},
        mask_form="zeros",
        lora=LoraSpec(("q_proj", "gate_proj")),
    )
    md = load_model_dir(src)
    assert {t.dtype for t in md.weights.values()} == {dtype}
    assert md.mask_source == "zeros-in-weights" and {m.dtype for m in md.masks.values()} == {torch.bool}
    weights = {k: v.clone() for k, v in md.weights.items()}
    model = build_reference_model(md)
    name = layer_param("llama", 0, "k")  # neither adapted nor masked: the stored values, upcast
    assert torch.equal(model.get_parameter(name), weights[name].float())
    result = export_engine(src, tmp_path / "out", ExportConfig(precision="fp32", benchmark=False, force=True))
    assert result.report["validation"]["onnx_fp32"][0]["max_abs"] <= TOL


# ------------------------------------------------------------------ rope scaling, sliding window, tying

CASES = {
    "rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "rope-llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            }
        },
    ),
    # max_position_embeddings 16: the 28-token generation crosses it, where dynamic NTK rescales
    "rope-dynamic": (
        "llama",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    ),
    "mistral-sliding-window-4": ("mistral", {"sliding_window": 4}),
    "tied-embeddings": ("llama", {"tie_word_embeddings": True}),
}


def transformers_generation(model, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(tokens, logits per step) of transformers' own greedy generate with its own cache."""
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences.numpy(), [logits.numpy() for logits in out.logits]


def cached_logits(
    session: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, tokens: np.ndarray
) -> list:
    """The exported decoder fed the same prompt and then transformers' tokens one by one, with its cache."""
    decoder = CachedDecoder(session)
    decoder.reset(ids.shape[0], mask)
    steps = [decoder.forward(ids)[:, -1]]
    for k in range(STEPS - 1):
        position = ids.shape[1] + k
        steps.append(decoder.forward(tokens[:, position : position + 1])[:, -1])
    return steps


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoder_matches_transformers_generation(case, tmp_path) -> None:
    family, overrides = CASES[case]
    model = build_base_model(family, seed=1, **overrides)
    path = tmp_path / "decoder.onnx"
    export_decoder_with_past(model, path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (2, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # a left-padded row
    tokens, want = transformers_generation(model, ids, mask)
    assert len(np.unique(tokens[:, 12:])) > 3, "degenerate test model"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused, _ = optimize(onnx.load(str(path)), "onnxruntime", family=family)
    onnx.save(fused, str(tmp_path / "fused.onnx"))
    sessions = {
        "exported": ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
        "fused (our onnxruntime passes)": ort.InferenceSession(
            str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"]
        ),
    }
    for what, session in sessions.items():
        for step, (got, ref) in enumerate(zip(cached_logits(session, ids, mask, tokens), want, strict=True)):
            error = float(np.abs(got - ref).max())
            assert error <= TOL, f"{case}, {what}: step {step} max abs logit error {error:.2e}"


def test_tied_embeddings_are_one_table_in_the_reference(model_dir_factory) -> None:
    src = model_dir_factory("llama", config_overrides={"tie_word_embeddings": True})
    md = load_model_dir(src)
    assert "lm_head.weight" not in md.weights  # tied checkpoints store the table once
    model = build_reference_model(md)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dynamic_rotary_is_swapped_only_while_tracing() -> None:
    model = build_base_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    original = model.model.rotary_emb
    with traceable_rotary(model) as swapped:
        assert swapped == 1 and isinstance(model.model.rotary_emb, StatelessDynamicRotary)
    assert model.model.rotary_emb is original
    with traceable_rotary(build_base_model("llama")) as swapped:
        assert swapped == 0
