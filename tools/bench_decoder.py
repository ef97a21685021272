"""Benchmark (not a test): prefill and decode tokens/s of a decoder with KV cache.

Variants, run interleaved in one process at the same thread count, medians over repeats:
- PyTorch eager fp32 with its own DynamicCache (the reference; eager attention, as exported),
- the same with PyTorch's SDPA attention (transformers' default attention),
- ONNX fp32 exported by `export_decoder_with_past`, on ONNX Runtime CPU (all graph optimizations),
- the same after our onnxruntime pass pipeline without the KV-cache attention fusion (RMSNorm fused,
  attention left as MatMul/Softmax: model.onnx as the export wrote it before that fusion),
- the same after the full onnxruntime pipeline: attention fused into GroupQueryAttention per layer
  (graph_passes/fuse_gqa_kv_cache.py; what the export writes as model.onnx now),
- ONNX INT8 from ONNX Runtime's `quantize_dynamic` (per-channel s8 weights of every MatMul, lm_head
  included; u8 activations quantized at run time), via `exporter.quantize.cpu_int8.build`, on the exported
  graph: the export's model.int8.cpu.onnx is built this way, from the cleaned, unfused graph,
- the same quantization applied to the fused fp32 graph (a bench-only variant: the export's INT8
  stage does not run the onnxruntime fusions).
- with `--openvino`: the exported fp32 graph on OpenVINO (engines/openvino_runner.py), and with
  `--export-dir OUT` (an export-engine OUT_DIR of this same model: `--save-model DIR` writes it, then
  `export-engine DIR -o OUT`) the export's own CPU engine candidates: model.int8.cpu.onnx on ONNX Runtime,
  model.int8.openvino.onnx and model.exported.onnx on OpenVINO.
Every variant is fed the same tokens (the PyTorch greedy continuation), so each does the same work.
INT8 accuracy vs ONNX fp32: logit cosine and top-1 agreement per decode step under those forced
tokens, and agreement of its own free-running greedy tokens with fp32's. The fused fp32 graph: max
abs logit error vs the exported one and whether its free-running greedy tokens are the same.

  OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python tools/bench_decoder.py --threads 2 --prompt 128 --new 64
  # vs onnxruntime-genai (tools/decoder_peers.py): build under the shared CPU lock, time under the exclusive one
  HF_HUB_OFFLINE=1 flock -s /tmp/cpu.lock python tools/bench_decoder.py --peers --build-only
  HF_HUB_OFFLINE=1 flock -x /tmp/cpu.lock python tools/bench_decoder.py --peers --reuse --repeats 7

On a shared machine, spinning thread pools wreck an interleaved comparison: with other processes
on the cores, PyTorch's OpenMP threads spinning at barriers made its decode ~4x slower (4.8 vs 21
tok/s measured here at load 5). So ORT's spinning is off by default (--ort-spinning turns it on) and
the command sets OpenMP's wait policy to passive (it must be set before torch loads, hence the env).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.export.external_data import save_onnx
from exporter.runtime.generation import CachedDecoder, generate
from graph_passes import pipeline
from graph_passes.fuse_gqa_kv_cache import FuseGroupQueryAttentionKvCache

Step = Callable[[np.ndarray], np.ndarray]  # new token ids -> logits of those tokens
FP32 = "ONNX fp32 (ORT CPU)"
UNFUSED = "ONNX fp32, our passes, attention unfused (ORT CPU)"
FUSED = "ONNX fp32, our passes + GroupQueryAttention (ORT CPU)"
INT8 = "ONNX INT8 dynamic (ORT CPU)"
FUSED_INT8 = "ONNX INT8 dynamic on the GQA-fused graph (ORT CPU)"


def build_model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=args.hidden // 8,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # always exactly `--new` tokens
    model.generation_config.pad_token_id = 0
    return model


class TorchCached:
    """PyTorch eager forward with its DynamicCache, same call shape as `CachedDecoder`."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.cache = DynamicCache()

    def reset(self, batch: int) -> None:
        self.cache = DynamicCache()

    def forward(self, new_ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(new_ids), cache=self.cache, use_cache=True)
        return out.logits.numpy()


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """The project's CPU INT8 variant (ORT dynamic quantization, per-channel s8 weights) when present."""
    try:
        from exporter.quantize.cpu_int8 import build
    except ImportError:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8)
        return
    from exporter.quantize.cpu_features import reduce_weight_range

    reduce_range, why = reduce_weight_range("auto")  # as the export decides: 7-bit where u8 x s8 saturates
    print(why)
    build(fp32_path, int8_path, excluded=frozenset(), reduce_range=reduce_range)


@contextmanager
def fusion_without(excluded: type) -> Iterator[None]:
    """The onnxruntime fusion stage with one pass left out, for the duration of the block."""
    stages = pipeline.PIPELINES["onnxruntime"]
    factory = stages["fusion"]
    stages["fusion"] = lambda: [p for p in factory() if not isinstance(p, excluded)]
    log = logging.getLogger(pipeline.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # the missed fusion is the point here, not a warning
    try:
        yield
    finally:
        stages["fusion"] = factory
        log.setLevel(level)


def optimized(fp32_path: Path, out_path: Path, *, kv_cache_gqa: bool) -> dict[str, int]:
    """Our onnxruntime pipeline on the exported decoder, with or without the KV-cache GQA fusion."""
    model = onnx.load(str(fp32_path))
    if kv_cache_gqa:
        out, report = pipeline.optimize(model, "onnxruntime", family="llama", strict_fusion=True)
    else:
        with fusion_without(FuseGroupQueryAttentionKvCache):
            out, report = pipeline.optimize(model, "onnxruntime", family="llama")
    save_onnx(out, out_path)
    ops = report.op_counts_after
    return {op: ops.get(op, 0) for op in ("GroupQueryAttention", "Softmax", "SimplifiedLayerNormalization")}


def session(path: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's pool spins after each run by default: in an interleaved benchmark the spinning threads
    # steal the cores PyTorch's OpenMP threads are about to use. Off unless --ort-spinning.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed_run(runner, tokens: np.ndarray, prompt: int) -> tuple[float, float, list[np.ndarray]]:
    """(prefill seconds, decode seconds, last-token logits per step) for forced `tokens`."""
    runner.reset(tokens.shape[0])
    start = time.perf_counter()
    logits = [runner.forward(tokens[:, :prompt])[:, -1]]
    middle = time.perf_counter()
    for t in range(prompt, tokens.shape[1] - 1):
        logits.append(runner.forward(tokens[:, t : t + 1])[:, -1])
    end = time.perf_counter()
    return middle - start, end - middle, logits


def paired_ratios(
    base: ort.InferenceSession, other: ort.InferenceSession, feeds: dict[str, np.ndarray], pairs: int
) -> tuple[float, float, float]:
    """Median ms of `base`, of `other`, and median of per-pair time ratios base/other, one call each
    per pair in alternating order: load changes on a shared machine hit both members of a pair."""
    base_ms, other_ms = [], []
    for i in range(pairs):
        for name, sess in (("b", base), ("o", other)) if i % 2 else (("o", other), ("b", base)):
            start = time.perf_counter()
            sess.run(None, feeds)
            (base_ms if name == "b" else other_ms).append((time.perf_counter() - start) * 1e3)
    ratios = [a / b for a, b in zip(base_ms, other_ms)]
    return statistics.median(base_ms), statistics.median(other_ms), statistics.median(ratios)


def step_feeds(tokens: np.ndarray, past_length: int, new: int, manifest) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Feeds of one call: `new` tokens after a (random) cache of `past_length`."""
    batch = tokens.shape[0]
    rng = np.random.default_rng(1)
    feeds = {
        "input_ids": tokens[:, past_length : past_length + new],
        "attention_mask": np.ones((batch, past_length + new), dtype=np.int64),
        "position_ids": np.tile(np.arange(past_length, past_length + new), (batch, 1)),
    }
    for i in manifest.cache_layers:
        for kv in ("key", "value"):
            shape = manifest.past_shape(i, batch, past_length)
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def openvino_variants(args: argparse.Namespace, fp32: Path) -> dict[str, CachedDecoder]:
    """--openvino / --export-dir: the CPU engine candidates of engines/cpu_selection.py on this model."""
    from engines import load_runner

    found: dict[tuple[str, Path], str] = {}
    if args.openvino or args.export_dir:
        found[("openvino", fp32)] = "ONNX fp32 as exported (OpenVINO)"
    if args.export_dir:
        found[("onnxruntime", args.export_dir / "model.int8.cpu.onnx")] = (
            "export: model.int8.cpu.onnx (ORT CPU)"
        )
        found[("openvino", args.export_dir / "model.int8.openvino.onnx")] = (
            "export: model.int8.openvino.onnx (OpenVINO)"
        )
        found[("openvino", args.export_dir / "model.int8.onnx")] = "export: model.int8.onnx, Q/DQ (OpenVINO)"
    runners = {}
    for (backend, path), name in found.items():
        if path.is_file():
            runner = load_runner(path, backend=backend, threads=args.threads, spinning=args.ort_spinning)
            runners[name] = CachedDecoder(runner.__enter__())
    return runners


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64, help="decode steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=101, help="alternating single-call pairs per phase")
    parser.add_argument("--ort-spinning", action="store_true", help="let ORT's thread pool spin between runs")
    parser.add_argument("--openvino", action="store_true", help="also the exported fp32 graph on OpenVINO")
    parser.add_argument("--export-dir", type=Path, help="an export of this model: its CPU engine candidates")
    parser.add_argument("--save-model", type=Path, help="write this model as a MODEL_DIR and stop")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="instead: our fp32/INT8/W8/INT4 files vs onnxruntime-genai's builder (tools/decoder_peers.py)",
    )
    parser.add_argument("--variants", nargs="+", default=["unpruned", "pruned"], help="--peers: models")
    parser.add_argument("--work", default="/tmp/bench_decoder_peers", help="--peers: scratch folder")
    parser.add_argument("--no-genai", action="store_true", help="--peers: skip the builder rows")
    parser.add_argument(
        "--eval-prompts", type=int, default=8, help="--peers: prompts for the accuracy columns"
    )
    parser.add_argument("--int4-config", default="{}", help="--peers: Int4Config fields as JSON")
    parser.add_argument("--build-only", action="store_true", help="--peers: build the files, time nothing")
    parser.add_argument(
        "--reuse", action="store_true", help="--peers: time the files of an earlier --build-only"
    )
    args = parser.parse_args()
    if args.peers:
        import decoder_peers

        decoder_peers.main(args)
        return
    torch.set_num_threads(args.threads)
    model = build_model(args)
    if args.save_model:
        model.save_pretrained(args.save_model)
        print(f"wrote {args.save_model}: export it with export-engine, then pass --export-dir")
        return
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, args.vocab, (args.batch, args.prompt), dtype=np.int64)
    with torch.no_grad():
        ids = torch.from_numpy(prompt)
        tokens = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, do_sample=False
        )
    tokens = tokens.numpy()
    assert tokens.shape[1] == args.prompt + args.new, tokens.shape
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"{name}.onnx" for name in ("fp32", "int8", "ours", "fused", "fused_int8")}
        manifest = export_decoder_with_past(model, files["fp32"])
        quantize_int8(files["fp32"], files["int8"])
        print("our passes without KV GQA:", optimized(files["fp32"], files["ours"], kv_cache_gqa=False))
        print("our passes with KV GQA:   ", optimized(files["fp32"], files["fused"], kv_cache_gqa=True))
        quantize_int8(files["fused"], files["fused_int8"])
        variants = {
            FP32: "fp32",
            UNFUSED: "ours",
            FUSED: "fused",
            INT8: "int8",
            FUSED_INT8: "fused_int8",
        }
        sessions = {
            name: session(files[key], args.threads, args.ort_spinning) for name, key in variants.items()
        }
        runners = {"PyTorch eager fp32 + cache": TorchCached(model)}
        sdpa = copy.deepcopy(model)
        sdpa.set_attn_implementation("sdpa")
        runners["PyTorch fp32 + cache, SDPA attention"] = TorchCached(sdpa)
        runners.update({name: CachedDecoder(s) for name, s in sessions.items()})
        runners.update(openvino_variants(args, files["fp32"]))
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
        logits: dict[str, list[np.ndarray]] = {}
        for runner in runners.values():
            timed_run(runner, tokens, args.prompt)  # warm-up
        order = list(runners)
        for _ in range(args.repeats):
            rng.shuffle(order)  # a fixed order penalises whichever variant runs right after PyTorch
            for name in order:
                runner = runners[name]
                prefill, decode, logits[name] = timed_run(runner, tokens, args.prompt)
                times[name][0].append(prefill)
                times[name][1].append(decode)
        report(args, manifest, times, logits, sessions, prompt)
        print(f"paired single calls, alternating, {args.pairs} pairs (median ms; ratio = unfused / fused):")
        for phase, past, new in (("prefill", 0, args.prompt), ("decode", args.prompt + args.new // 2, 1)):
            feeds = step_feeds(tokens, past, new, manifest)
            for fused, unfused in ((FUSED, UNFUSED), (FUSED_INT8, INT8)):
                base, other, ratio = paired_ratios(sessions[unfused], sessions[fused], feeds, args.pairs)
                print(
                    f"  {phase} (past {past}, {new} new): {unfused} {base:.2f} ms, {fused} {other:.2f} ms, "
                    f"speed-up {ratio:.2f}x"
                )


def report(args, manifest, times, logits, sessions, prompt) -> None:  # type: ignore[no-untyped-def]
    print(
        f"model: llama hidden {args.hidden}, {args.layers} layers, GQA 8/2, vocab {args.vocab}, "
        f"{sum(layer.n_kv for layer in manifest.layers if layer is not None)} KV heads total; batch {args.batch}, "
        f"prompt {args.prompt}, {args.new} new tokens; {args.threads} threads; median of {args.repeats}; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, ORT spinning {args.ort_spinning}"
    )
    reference = "PyTorch eager fp32 + cache"
    base_prefill, base_decode = (statistics.median(t) for t in times[reference])
    print("| variant | prefill tok/s | decode tok/s | prefill × | decode × |")
    print("|---|---|---|---|---|")
    for name, (prefill, decode) in times.items():
        p, d = statistics.median(prefill), statistics.median(decode)
        steps = args.new - 1
        print(
            f"| {name} | {args.batch * args.prompt / p:.0f} | {args.batch * steps / d:.1f} "
            f"| {base_prefill / p:.2f} | {base_decode / d:.2f} |"
        )
    for name in (FUSED, FUSED_INT8):
        base = UNFUSED if name == FUSED else INT8
        ratios = [
            statistics.median(a / b for a, b in zip(times[base][phase], times[name][phase]))
            for phase in (0, 1)
        ]
        print(
            f"{name} vs {base}, median of per-round speed ratios: prefill {ratios[0]:.2f}x, decode {ratios[1]:.2f}x"
        )
    fp32 = logits[FP32]
    torch_max = max(float(np.abs(a - b).max()) for a, b in zip(fp32, logits[reference]))
    fused_max = max(float(np.abs(a - b).max()) for a, b in zip(fp32, logits[FUSED]))
    print(f"ONNX fp32 vs PyTorch: max abs logit error {torch_max:.2e} over all steps")
    free = {
        name: generate(sessions[name], prompt, max_new_tokens=args.new)
        for name in (FP32, FUSED, INT8, FUSED_INT8)
    }
    print(
        f"fused GQA vs exported fp32: max abs logit error {fused_max:.2e} over all steps; free greedy tokens "
        f"{'identical' if (free[FUSED] == free[FP32]).all() else 'DIFFERENT'}"
    )
    for name in (INT8, FUSED_INT8):
        int8 = logits[name]
        cosines = [cosine(a[row], b[row]) for a, b in zip(fp32, int8) for row in range(a.shape[0])]
        top1 = np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(fp32, int8)])
        same = free[FP32][:, args.prompt :] == free[name][:, args.prompt :]
        first_diff = int(np.argmin(same[0])) if not same[0].all() else args.new
        print(
            f"{name} vs fp32 (forced tokens): mean logit cosine {np.mean(cosines):.4f} "
            f"(min {np.min(cosines):.4f}), top-1 agreement {top1:.3f}; free greedy: {same.mean():.3f} of "
            f"tokens equal, first divergence at step {first_diff} of {args.new}"
        )


if __name__ == "__main__":
    main()
