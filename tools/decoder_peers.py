"""`tools/bench_decoder.py --peers`: our fp32 / INT8 / INT4 decoder files against onnxruntime-genai's model
builder (fp32, int8, int4), one harness, on an unpruned and a pruned random-init Llama.

Models (random init, hidden 512, 8 layers, GQA 8:2, vocab 32k, FFN 1408, untied embeddings), both with a few
planted outlier channels after every RMSNorm (the activation pattern of trained LLMs; the fp32 function is
unchanged, tools/bench_decoder_calibration.py `plant_outlier_channels`), so the accuracy columns mean
something for weight-only quantization:
- `unpruned`: the builder exports it too (`python -m onnxruntime_genai.models.builder -i DIR -o OUT -p
  int4|int8|fp32 -e cpu`; DIR holds config.json, model.safetensors and a tokenizer.json built with `tokenizers`);
- `pruned`: 30% of every layer's FFN neurons removed (1408 -> 986, not a multiple of the block) and one of the
  two KV groups (with its 4 query heads) removed in layers 0, 2, 4, 6: per-layer widths, which the builder cannot
  export (it reads one global head count and FFN width from config.json).
Ours: the export's own stages on the exported decoder: `model.onnx` (our onnxruntime passes), the INT8 CPU
file (dynamic u8 x s8 of the fused graph, `exporter.quantize.cpu_int8.build`), a W8 file (MatMulNBits 8-bit,
the INT4 stage's plan at 8 bits) and `model.int4.cpu.onnx` (`run_int4_stage`, random-id calibration), and
the runtime's prefill/decode pair (exporter.runtime.generation: the prompt on the INT8 file, the steps on the
INT4 file, one cache; timed, its accuracy is its two files' rows).
Harness: plain ORT sessions, same options for every file (2 threads, all graph optimizations, thread
spinning off unless --ort-spinning), batch 1, prefill `--prompt` tokens then `--new` greedy decode steps with
the fp32 model's tokens forced (same work for every file), rounds interleaved in a new random order, medians.
Accuracy vs our fp32 `model.onnx` (genai rows vs genai fp32): `exporter.runtime.generation.greedy_agreement`
over `--eval-prompts` random prompts x 32 new tokens (logit cosine; teacher-forced and free-running agreement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.export.external_data import save_onnx
from exporter.quantize.calibration import load_calibration
from exporter.quantize.int4_stage import PACKED_PROJECTIONS, Int4Config, run_int4_stage
from exporter.runtime.generation import CachedDecoder, greedy_agreement
from graph_passes import pipeline

PAIR = "ours INT8 prefill + INT4 decode"  # exporter.runtime.generation.CachedDecoder(int4, prefill=int8)
PAIR_PARTS = ("ours int8", "ours int4")
OUTLIER_CHANNELS, OUTLIER_GAIN = [3, 77, 200, 401], 30.0
HEAD_DIM = 64


@torch.no_grad()
def plant_outlier_channels(model: nn.Module) -> None:
    """A few 30x channels after every RMSNorm, the readers' columns divided back: same fp32 function."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in (
            (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
        ):
            norm.weight[OUTLIER_CHANNELS] *= OUTLIER_GAIN
            for linear in readers:
                linear.weight[:, OUTLIER_CHANNELS] /= OUTLIER_GAIN


def build_llama(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        num_hidden_layers=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    plant_outlier_channels(model)
    return model


@torch.no_grad()
def prune(model: nn.Module, ffn_keep: float = 0.7, kv_layers: tuple[int, ...] = (0, 2, 4, 6)) -> nn.Module:
    """Keep the first `ffn_keep` of every layer's FFN neurons; in `kv_layers` keep KV group 0 only."""

    def linear(weight: torch.Tensor) -> nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.copy_(weight)
        return layer

    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        keep = int(mlp.gate_proj.out_features * ffn_keep)
        mlp.gate_proj, mlp.up_proj = linear(mlp.gate_proj.weight[:keep]), linear(mlp.up_proj.weight[:keep])
        mlp.down_proj = linear(mlp.down_proj.weight[:, :keep])
        if index in kv_layers:
            attn = layer.self_attn
            q_rows = attn.num_key_value_groups * HEAD_DIM  # group 0: query heads 0..3
            attn.q_proj = linear(attn.q_proj.weight[:q_rows])
            attn.k_proj = linear(attn.k_proj.weight[:HEAD_DIM])
            attn.v_proj = linear(attn.v_proj.weight[:HEAD_DIM])
            attn.o_proj = linear(attn.o_proj.weight[:, :q_rows])
    return model


def write_hf_folder(model: nn.Module, folder: Path) -> None:
    """config.json + model.safetensors + a word-level tokenizer.json of the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(str(folder))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, model.config.vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(folder))


def genai_build(folder: Path, out: Path, precision: str) -> tuple[Path, float]:
    """The builder's command line, as users run it; the model file and the seconds it took."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out)]
    subprocess.run([*command, "-p", precision, "-e", "cpu"], check=True, capture_output=True)
    return out / "model.onnx", time.perf_counter() - start


class FilteredSession:
    """An ORT session that ignores feeds it has no input for and reports a static head size, so genai's
    files (no position_ids; past head size named `kv_cache_dim`) run through `CachedDecoder`."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.names = {i.name for i in session.get_inputs()}

    def get_inputs(self) -> list[Any]:
        inputs = []
        for i in self.session.get_inputs():
            shape = [HEAD_DIM if d == "kv_cache_dim" else d for d in i.shape]
            inputs.append(
                dataclasses.make_dataclass("Input", ["name", "shape", "type"])(i.name, shape, i.type)
            )
        return inputs

    def get_outputs(self) -> list[Any]:
        return self.session.get_outputs()

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(names, {k: v for k, v in feeds.items() if k in self.names})


def session(path: Path, threads: int, spinning: bool) -> FilteredSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return FilteredSession(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))


def our_files(model: nn.Module, root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """fp32 model.onnx (fused), INT8 CPU (dynamic), W8 MatMulNBits, INT4 (the export's stage)."""
    from exporter.quantize import int4
    from exporter.quantize.cpu_features import reduce_weight_range
    from exporter.quantize.cpu_int8 import build

    root.mkdir(parents=True, exist_ok=True)
    exported = root / "model.exported.onnx"
    export_decoder_with_past(model, exported)
    fused, _ = pipeline.optimize(onnx.load(str(exported)), "onnxruntime", family="llama", sparsity="off")
    files = {"fp32": save_onnx(fused, root / "model.onnx")}
    reduce_range, _ = reduce_weight_range("auto")
    files["int8"] = build(files["fp32"], root / "model.int8.cpu.onnx", frozenset(), reduce_range)
    data = load_calibration(
        "random", None, ["input_ids", "attention_mask"], 4, 128, 32, 8, seed=0, vocab_size=32000
    )
    config = Int4Config(**json.loads(args.int4_config))
    start = time.perf_counter()
    result = run_int4_stage(exported, root, data, config, family="llama", optimized=files["fp32"])
    seconds = time.perf_counter() - start
    files["int4"] = result.cpu_path
    report = result.report
    print(
        f"  INT4 stage {seconds:.0f} s: method {report['method']}, 8-bit layers {report['int8_layers']}, held-out "
        f"cosine cpu {report['cpu']['heldout_cosine']:.5f} / tensorrt {report['tensorrt']['heldout_cosine']:.5f}; "
        f"all-4-bit search cosine by method {report['method_comparison_search_cosine']}"
    )
    errors = {
        m: np.mean([row.get("error_rtn" if m == "rtn" else "error", 0) for row in report["layers"]])
        for m in ("rtn", "awq")
    }
    print(f"  mean relative output error per layer: RTN {errors['rtn']:.2e}, chosen {errors['awq']:.2e}")
    cpu_fp32 = onnx.load(str(files["fp32"]))
    sites = int4.find_sites(cpu_fp32)
    prepared = int4.prepare(cpu_fp32, sites, None, method="rtn", block_size=32)
    bits = {**{s.node: 8 for s in sites}, int4.EMBEDDING: 8}
    w8, _ = int4.cpu_model(cpu_fp32, prepared.plan(bits), 4, PACKED_PROJECTIONS)
    files["w8"] = save_onnx(w8, root / "model.w8.cpu.onnx")
    return files


def timed(runner: CachedDecoder, tokens: np.ndarray, prompt: int) -> tuple[float, float]:
    runner.reset(tokens.shape[0])
    start = time.perf_counter()
    runner.forward(tokens[:, :prompt])
    middle = time.perf_counter()
    for t in range(prompt, tokens.shape[1] - 1):
        runner.forward(tokens[:, t : t + 1])
    return middle - start, time.perf_counter() - middle


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name)) / 2**20


def measure(
    files: dict[str, Path], args: argparse.Namespace, tokens: np.ndarray
) -> dict[str, tuple[float, float]]:
    sessions = {name: session(path, args.threads, args.ort_spinning) for name, path in files.items()}
    runners = {name: CachedDecoder(s) for name, s in sessions.items()}
    if PAIR_PARTS[0] in sessions and PAIR_PARTS[1] in sessions:  # the runtime's prefill/decode pair
        runners[PAIR] = CachedDecoder(sessions[PAIR_PARTS[1]], prefill=sessions[PAIR_PARTS[0]])
    for runner in runners.values():
        timed(runner, tokens, args.prompt)  # warm-up
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
    rng = np.random.default_rng(1)
    order = list(runners)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for name in order:
            prefill, decode = timed(runners[name], tokens, args.prompt)
            times[name][0].append(prefill)
            times[name][1].append(decode)
    steps = tokens.shape[1] - 1 - args.prompt
    return {
        name: (args.prompt / statistics.median(p), steps / statistics.median(d))
        for name, (p, d) in times.items()
    }


def quality(reference: Path, candidate: Path, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1000, 31000, size=32) for _ in range(args.eval_prompts)]
    ref, cand = session(reference, args.threads, False), session(candidate, args.threads, False)
    return greedy_agreement(ref, cand, prompts, max_new_tokens=32)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    root = Path(args.work)
    manifest = root / "files.json"
    if not args.reuse:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        built = {v: {k: str(p) for k, p in build_files(v, root, args).items()} for v in args.variants}
        manifest.write_text(json.dumps(built, indent=1))
        if args.build_only:  # built under a shared CPU lock; timed later under the exclusive one (--reuse)
            return
    all_files = json.loads(manifest.read_text())
    rows: list[dict[str, Any]] = []
    for variant in args.variants:
        files = {k: Path(v) for k, v in all_files[variant].items()}
        rng = np.random.default_rng(0)
        prompt = rng.integers(1000, 31000, size=(1, args.prompt))
        tokens = _greedy_tokens(files["ours fp32"], prompt, args)
        speeds = measure(files, args, tokens)
        if PAIR in speeds:
            row = {"model": variant, "file": PAIR, "prefill": speeds[PAIR][0], "decode": speeds[PAIR][1]}
            rows.append({**row, "note": "prompt on the INT8 row's file, steps on the INT4 row's"})
            print(json.dumps(rows[-1]), flush=True)
        for name, path in files.items():
            reference = files["genai fp32"] if name.startswith("genai") else files["ours fp32"]
            row = {
                "model": variant,
                "file": name,
                "prefill": speeds[name][0],
                "decode": speeds[name][1],
                "mb": size_mb(path),
            }
            if not name.endswith("fp32"):
                row.update(quality(reference, path, args))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if variant == "pruned":
            rows.append({"model": variant, "file": "genai (any)", "note": "cannot export per-layer widths"})
    table(rows, args)


def build_files(variant: str, root: Path, args: argparse.Namespace) -> dict[str, Path]:
    model = build_llama(args) if variant == "unpruned" else prune(build_llama(args))
    print(f"{variant}: building files ...", flush=True)
    files = {f"ours {k}": v for k, v in our_files(model, root / variant / "ours", args).items()}
    if variant == "unpruned" and not args.no_genai:
        folder = root / variant / "hf"
        write_hf_folder(model, folder)
        for precision in ("fp32", "int8", "int4"):
            out = root / variant / f"genai_{precision}"
            files[f"genai {precision}"], seconds = genai_build(folder, out, precision)
            print(f"  genai builder -p {precision}: {seconds:.1f} s", flush=True)
    return files


def _greedy_tokens(fp32: Path, prompt: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    from exporter.runtime.generation import generate

    return generate(session(fp32, args.threads, False), prompt, max_new_tokens=args.new)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nbatch 1, prefill {args.prompt}, {args.new} greedy steps, {args.threads} threads, ORT {ort.__version__}, "
        f"median of {args.repeats} interleaved rounds, spinning {args.ort_spinning}, load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| model | file | prefill tok/s | decode tok/s | size MiB | logit cosine | greedy (forced) | greedy (free) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "note" in r and "prefill" in r:
            print(
                f"| {r['model']} | {r['file']} | {r['prefill']:.0f} | {r['decode']:.1f} | — | — | — | {r['note']} |"
            )
            continue
        if "note" in r:
            print(f"| {r['model']} | {r['file']} | — | — | — | — | — | {r['note']} |")
            continue
        q = (f"{r['logit_mean_cosine']:.4f} | {r['greedy_agreement']:.3f} | {r['free_running_agreement']:.3f}"
             if "logit_mean_cosine" in r else "1 | 1 | 1")  # fmt: skip
        print(
            f"| {r['model']} | {r['file']} | {r['prefill']:.0f} | {r['decode']:.1f} | {r['mb']:.1f} | {q} |"
        )
