"""`export-engine MODEL_DIR -o OUT_DIR`: maps flags onto ExportConfig and calls the API. Nothing else.
`export-engine run OUT_DIR TEXT ...`: one input through `exporter.load(OUT_DIR)` for a quick check (a
MODEL_DIR literally named "run" is passed as ./run).

Exit codes: 0 success, 2 bad input or usage, 1 a failed check or an internal error. Errors are one
line on stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from engines.cpu_selection import NAMES as CPU_ENGINES
from export_errors import ExportEngineError, InputError
from exporter.config import RANGES, ExportConfig, Range
from exporter.console import console, summary

TASK_CHOICES = (
    "feature-extraction",
    "sentence-similarity",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "text-generation-with-past",
    "text-generation",
)  # exporter/tasks/registry.py (a test keeps the two equal; the parser stays free of heavy imports)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _checked(kind: type, accepted: Range) -> Callable[[str], Any]:
    """An argparse `type` that also range-checks, so `--batch-size -1` is one line naming the flag, exit 2."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        problem = accepted.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _ranged(field: str, kind: type) -> Callable[[str], Any]:
    return _checked(kind, RANGES[field][1])


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="export-engine", description="Pruned + LoRA HF model -> exact compact ONNX -> INT8 engine."
    )
    p.add_argument("model_dir", type=Path, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (created; see --force)")
    p.add_argument(
        "--precision",
        choices=["int8", "fp32", "int4"],
        default="int8",
        help="final precision (default int8); int4: weight-only INT4 for causal LMs with a KV cache",
    )
    p.add_argument(
        "--adapter", type=Path, help="PEFT LoRA adapter folder (default: MODEL_DIR/adapter if present)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--backend",
        choices=["auto", "tensorrt", "onnxruntime", "openvino"],
        default="auto",
        help="auto: TensorRT when it imports and a CUDA GPU is present, else the fastest CPU engine that "
        "passes its accuracy gate, chosen by measurement; onnxruntime / openvino: that CPU runtime's candidates only",
    )
    p.add_argument(
        "--cpu-engine",
        choices=list(CPU_ENGINES),
        help="pin the CPU engine instead of choosing it by measurement (it must still pass its accuracy gate)",
    )
    p.add_argument(
        "--task",
        choices=TASK_CHOICES,
        help="the task to export (default: the adapter's PEFT task_type, else config.json's architectures, "
        "e.g. BertForSequenceClassification -> text-classification; causal LMs: text-generation-with-past)",
    )
    p.add_argument("--calibration", help="calibration data: FILE.txt, FILE.jsonl, FILE.npz, or 'random'")
    p.add_argument(
        "--calibration-samples",
        type=_ranged("calibration_samples", int),
        default=128,
        help="number of calibration samples",
    )
    p.add_argument(
        "--calibration-method",
        choices=["max", "percentile", "entropy", "mse"],
        help="activation range method (default: the measured best, see README)",
    )
    p.add_argument(
        "--cpu-int8-weights",
        choices=["auto", "full", "reduced"],
        default="auto",
        help="weights of model.int8.cpu.onnx: 8-bit (full) or 7-bit (reduced, for CPUs without VNNI whose "
        "u8 x s8 kernel saturates); auto: by this CPU (default: auto)",
    )
    p.add_argument(
        "--calibration-decode-steps",
        type=_ranged("calibration_decode_steps", int),
        help="KV-cache decoders: decode steps (past fed back) calibrated after each prefill; 0: prefills "
        "only (default: 0, measured: see README)",
    )
    p.add_argument(
        "--accuracy-target",
        type=_ranged("accuracy_target", float),
        default=0.99,
        help="INT8 gate: minimum mean token cosine vs fp32 on held-out data",
    )
    p.add_argument(
        "--int4-method",
        choices=["awq", "rtn"],
        help="--precision int4: activation-aware scales + clipping (awq) or round-to-nearest (rtn) "
        "(default: awq, measured: see README)",
    )
    p.add_argument(
        "--int4-block-size",
        type=_ranged("int4_block_size", int),
        default=None,
        help="--precision int4: weights per scale along K (default 128, at most the hidden size; measured: "
        "README INT4; a streamed per-piece file: 32)",
    )
    p.add_argument(
        "--int4-lm-head",
        choices=["auto", "int4", "int8"],
        default="auto",
        help="--precision int4: lm_head in 4-bit or 8-bit blocks (auto: the measured default, 4-bit)",
    )
    p.add_argument(
        "--int4-accuracy-target",
        type=_ranged("int4_accuracy_target", float),
        help="--precision int4 gate: minimum held-out mean logit cosine vs fp32 (default 0.95)",
    )
    p.add_argument(
        "--int4-prefill",
        choices=["auto", "int8", "off"],
        default="auto",
        help="--precision int4 on a CPU: also write model.int8.cpu.onnx to run the prompt (dynamic INT8, faster "
        "on whole prompts) while model.int4.cpu.onnx runs every step; auto: kept where it passes its gate "
        "and its prefill is measured faster; int8: always; off: never",
    )
    p.add_argument(
        "--agreement-target",
        type=_ranged("agreement_target", float),
        default=0.99,
        help="INT8 gate of classifiers, taggers and QA models: minimum held-out agreement with fp32 "
        "(labels, tokens' labels, answer spans)",
    )
    p.add_argument(
        "--eval-data",
        type=Path,
        help="labeled FILE.jsonl: accuracy and F1 of every stage (formats: README 'Tasks')",
    )
    p.add_argument(
        "--sequence-length",
        type=_ranged("sequence_length", int),
        default=128,
        help="sequence length for validation and calibration",
    )
    p.add_argument(
        "--batch-size", type=_ranged("batch_size", int), default=2, help="batch size for calibration"
    )
    p.add_argument(
        "--streaming",
        choices=["auto", "on", "off"],
        default="auto",
        help="KV-cache decoders: export one layer at a time from the safetensors shards (auto: when the "
        "fp32 weights exceed 4 GiB)",
    )
    p.add_argument("--strict-fusion", action="store_true", help="fail when an expected fusion did not fire")
    p.add_argument(
        "--sparsity",
        choices=["tag", "enforce", "off"],
        default="tag",
        help="2:4 sparsity: tag eligible weights, enforce 2:4 by magnitude, or off",
    )
    p.add_argument("--no-benchmark", action="store_true", help="skip timing the stages for the report")
    p.add_argument(
        "--threads",
        type=_ranged("benchmark_threads", int),
        default=2,
        help="threads for ONNX Runtime / PyTorch timing",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .bin/.pt checkpoints (loaded with torch.load(weights_only=True))",
    )
    p.add_argument("--seed", type=_ranged("seed", int), default=0, help="seed for everything random")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show our detail (every pass's counts, each decision)",
    )
    p.add_argument("--quiet", action="store_true", help="only errors on stderr")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and our debug detail")
    return p


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(
        precision=args.precision,
        adapter=args.adapter,
        force=args.force,
        backend=args.backend,
        cpu_engine=args.cpu_engine,
        task=args.task,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        calibration_method=args.calibration_method,
        calibration_decode_steps=args.calibration_decode_steps,
        cpu_int8_weights=args.cpu_int8_weights,
        accuracy_target=args.accuracy_target,
        int4_method=args.int4_method,
        int4_block_size=args.int4_block_size,
        int4_lm_head=args.int4_lm_head,
        int4_accuracy_target=args.int4_accuracy_target,
        int4_prefill=args.int4_prefill,
        agreement_target=args.agreement_target,
        eval_data=args.eval_data,
        sequence_length=args.sequence_length,
        batch_size=args.batch_size,
        strict_fusion=args.strict_fusion,
        streaming=args.streaming,
        sparsity=args.sparsity,
        benchmark=not args.no_benchmark,
        benchmark_threads=args.threads,
        allow_pickle=args.allow_pickle,
        seed=args.seed,
    )


def build_run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="export-engine run", description="Run one input through an export (exporter.load).")
    p.add_argument("out_dir", type=Path, help="an export-engine output folder")
    p.add_argument("text", nargs="+", help="the input text(s); for question-answering the question")
    p.add_argument("--pair", help="text-classification: the second text of a pair")
    p.add_argument("--context", help="question-answering: the context to find the answer in")
    p.add_argument("--file", help="the file to run (default: the one the export chose, see report.json)")
    p.add_argument(
        "--max-new-tokens",
        type=_checked(int, Range(1)),
        default=32,
        help="text generation: new tokens (default 32)",
    )
    p.add_argument(
        "--top-k", type=_checked(int, Range(1)), default=5, help="fill-mask: proposals per mask (default 5)"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run_main(argv: list[str]) -> int:
    """`export-engine run OUT_DIR TEXT ...`: the task's result as JSON on stdout."""
    args = build_run_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="export-engine: %(message)s", stream=sys.stderr)
    if not args.debug:
        warnings.filterwarnings("ignore")
    from exporter.runtime.task_model import load

    try:
        with load(args.out_dir, file=args.file) as model:
            result = _run_task(model, args)
    except ExportEngineError as exc:
        if args.debug:
            raise
        print(f"export-engine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result, indent=2, default=float))
    return 0


def _run_task(model, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    metric = model.task.metric
    if args.context is not None and metric != "question-answering":
        raise InputError("--context", f"is for question-answering; this export is {model.task.name}")
    if args.pair is not None and metric != "classification":
        raise InputError("--pair", f"is for text-classification; this export is {model.task.name}")
    if metric == "classification":
        return model.classify(args.text, [args.pair] * len(args.text) if args.pair else None)
    if metric == "token-classification":
        return model.tag(args.text)
    if metric == "question-answering":
        if args.context is None:
            raise InputError("--context", "question-answering needs --context")
        return model.answer(" ".join(args.text), args.context)
    if metric == "fill-mask":
        return model.fill_mask(" ".join(args.text), top_k=args.top_k)
    if metric == "causal-lm":
        return {"generated": model.generate(" ".join(args.text), max_new_tokens=args.max_new_tokens)}
    embeddings = model.embed(args.text)
    return [np.asarray(e).round(6).tolist() for e in embeddings]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return run_main(argv[1:])
    args = build_parser().parse_args(argv)
    with console(args.verbose, args.quiet, args.json, args.debug):
        code, result = _export(args)
    if result is None:
        return code
    if args.json:
        print(json.dumps(result.report, indent=2, sort_keys=True, default=str))
    elif not args.quiet:
        names = sorted(p.name for p in result.artifacts.values())
        print("\n".join(summary(result.report, str(result.output_dir), names)))
    return 0


def _export(args: argparse.Namespace) -> tuple[int, Any]:
    """(exit code, ExportResult or None): errors are one line on stderr naming where the log is."""
    from exporter.api import export_engine  # heavy imports after argument parsing

    try:
        return 0, export_engine(args.model_dir, args.output, config_from_args(args))
    except ExportEngineError as exc:
        if args.debug:
            raise
        print(f"export-engine: error: {exc}{_log_note(exc)}", file=sys.stderr)
        return exc.exit_code, None
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"export-engine: internal error: {type(exc).__name__}: {_one_line(exc)} (--debug shows the traceback"
            f"{'; ' + _log_note(exc).strip(' ()') if _log_note(exc) else ''})",
            file=sys.stderr,
        )
        return 1, None


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _log_note(exc: BaseException) -> str:
    """Where a failed export's log (libraries' messages, the traceback) was kept, when it got that far."""
    path = getattr(exc, "log_path", None)
    return f" (log: {path})" if path is not None else ""


if __name__ == "__main__":
    sys.exit(main())
