"""Benchmark (not a test): what removing whole sublayers buys a KV-cache decoder, vs keeping "one zero unit".

A random-init Llama (hidden 512, 8 layers, GQA 8/2, FFN 1408, vocab 32k, as tools/bench_decoder.py)
with a quarter of its sublayers wholly masked: the attention of layers 2 and 5 (every o_proj column)
and the MLP of layers 3 and 6 (every down_proj column). Three exports of the same shapes otherwise,
each through `restructure` -> `export_decoder_with_past` -> our onnxruntime passes (model.onnx):
- unpruned: nothing masked (the cost before pruning);
- one unit kept: the same layers pruned to one live KV group (2 query heads) and one live neuron —
  the shapes the previous release exported for a wholly masked sublayer ("one zero unit": attention
  over the whole context and a KV cache for it at every step, an FFN of width 1);
- removed: the wholly masked sublayers gone (this release): no projections, no attention, no cache.
Prefill (batch 1 x --prompt tokens) and --new greedy decode steps with the cache, every variant fed
the same tokens, rounds interleaved in a new random order each, ONNX Runtime CPU with spinning off;
medians. FLOPs per token from the restructure plan (exporter/restructure/flops.py) at the final context.

  HF_HUB_OFFLINE=1 python tools/bench_layer_removal.py --threads 2 --prompt 128 --new 64 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from bench_decoder import build_model, session, timed_run

from exporter.export.decoder_with_past import export_decoder_with_past
from exporter.export.external_data import save_onnx
from exporter.restructure import flops
from exporter.restructure.remove_dead import restructure
from exporter.runtime.generation import CachedDecoder
from graph_passes import pipeline

ATTENTION_LAYERS, MLP_LAYERS = (2, 5), (3, 6)


@torch.no_grad()
def masked(model: torch.nn.Module, keep_one: bool) -> torch.nn.Module:
    """The model with those sublayers wholly masked, or (keep_one) masked down to one live unit."""
    model = copy.deepcopy(model)
    for i in ATTENTION_LAYERS:
        o_proj = model.model.layers[i].self_attn.o_proj
        live = 2 * o_proj.weight.shape[1] // 8 if keep_one else 0  # the 2 query heads of KV group 0
        o_proj.weight[:, live:] = 0
    for i in MLP_LAYERS:
        model.model.layers[i].mlp.down_proj.weight[:, 1 if keep_one else 0 :] = 0
    return model


def exported(model: torch.nn.Module, folder: Path, name: str, context: int) -> tuple[Path, int, int]:
    """(our optimized model.onnx, FLOPs per token at `context`, KV caches) of the restructured `model`."""
    plan = restructure(model)
    raw = folder / f"{name}.exported.onnx"
    manifest = export_decoder_with_past(model, raw)
    out, _ = pipeline.optimize(onnx.load(str(raw)), "onnxruntime", family="llama", strict_fusion=True)
    path = save_onnx(out, folder / f"{name}.onnx")
    return path, flops.at_context(plan.flops_per_token()["after"], context), len(manifest.cache_layers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.ort_spinning = False
    torch.set_num_threads(args.threads)
    base = build_model(args)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.prompt + args.new), dtype=np.int64)
    context = args.prompt + args.new
    variants = {
        "unpruned": copy.deepcopy(base),
        "one unit kept (previous release's shapes)": masked(base, keep_one=True),
        "removed (this release)": masked(base, keep_one=False),
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            name: exported(model, Path(tmp), f"v{i}", context)
            for i, (name, model) in enumerate(variants.items())
        }
        runners = {
            name: CachedDecoder(session(path, args.threads, False)) for name, (path, _, _) in files.items()
        }
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
        for runner in runners.values():
            timed_run(runner, tokens, args.prompt)  # warm-up
        order = list(runners)
        for _ in range(args.repeats):
            rng.shuffle(order)
            for name in order:
                prefill, decode, _ = timed_run(runners[name], tokens, args.prompt)
                times[name][0].append(prefill)
                times[name][1].append(decode)
    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, GQA 8/2, vocab {args.vocab}; attention removed in "
        f"layers {ATTENTION_LAYERS}, MLP in {MLP_LAYERS}; batch {args.batch}, prompt {args.prompt}, {args.new} "
        f"decode steps; {args.threads} threads; median of {args.repeats} interleaved rounds; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"| variant | KV caches | layer FLOPs/token at T={context} | prefill tok/s | decode tok/s | decode x |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    reference = statistics.median(times["unpruned"][1])
    for name, (prefill, decode) in times.items():
        prefill_rate = args.batch * args.prompt / statistics.median(prefill)
        decode_rate = args.batch * (args.new - 1) / statistics.median(decode)
        print(
            f"| {name} | {files[name][2]} | {files[name][1]:,} | {prefill_rate:.0f} | {decode_rate:.1f} "
            f"| {reference / statistics.median(decode):.2f} |"
        )


if __name__ == "__main__":
    main()
