"""`engine-bench`: trtexec's benchmark, with trtexec's flag names and summary layout, on any backend.

    engine-bench model.onnx --shapes=input_ids:8x128,attention_mask:8x128
    engine-bench model.int8.onnx --backend openvino   # the same file on OpenVINO
    engine-bench OUT_DIR                       # every .onnx stage in an export folder, interleaved,
                                               # and the CPU engine candidates the export measured
    engine-bench --compare a.onnx b.onnx       # interleaved in one process, ratios to the first

An export folder whose report.json kept a prefill/decode pair (`--precision int4`: the prompt on
model.int8.cpu.onnx, every step on model.int4.cpu.onnx) also gets two generations timed as one query each
(engines/generation_runner.py): the pair, and the decode file alone, the prompt of `--shapes` then 32 steps.

The CLI maps flags onto `BenchOptions` and calls `benchmark_models`; the printed summary follows
trtexec's `printEpilog` (samples/common/sampleReporting.cpp) line for line, with the GPU lines
(Enqueue/H2D/GPU Compute/D2H, Total GPU Compute Time) only when the runner timed them with CUDA events.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import engines
from engines import bench_inputs, benchmark, cpu_selection, stats
from engines.benchmark import BenchConfig, BenchResult, Variant
from engines.generation_runner import DEFAULT_STEPS, GenerationRunner, recorded_pair
from export_errors import ExportEngineError, InputError

logger = logging.getLogger(__name__)

# An export folder's stages in pipeline order: compact fp32 export, optimized graph, INT8 (TensorRT Q/DQ), INT8 (CPU),
# INT8 for OpenVINO.
STAGE_ORDER = (
    "model.exported.onnx",
    "model.onnx",
    "model.int8.onnx",
    "model.int8.cpu.onnx",
    "model.int8.openvino.onnx",
)
# Files only one runtime reads as intended (with --backend auto).
FILE_BACKENDS = {"model.int8.openvino.onnx": "openvino"}
ENQUEUE_BOUND_THRESHOLD = 0.8  # trtexec's kENQUEUE_BOUND_REPORTING_THRESHOLD


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What to run and how; the CLI builds this from flags."""

    config: BenchConfig = dataclasses.field(default_factory=BenchConfig)
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    backend: str = "auto"
    threads: int | None = None
    load_inputs: Path | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Target:
    """One variant to time: a file on a backend ("auto": by suffix), OpenVINO's precision hint, a label."""

    path: Path
    backend: str = "auto"
    precision: str | None = None
    label: str | None = None
    # a generation (engines/generation_runner.py): the prompt on `prefill` (None: on `path`), then the steps
    generation_steps: int = 0
    prefill: Path | None = None


def model_targets(targets: Sequence[str | Path], backend: str = "auto") -> list[Target]:
    """`model_paths`, each on `backend`. With `auto`, an export folder's OpenVINO file runs on OpenVINO, and
    the folder also brings the CPU engine candidates its report.json measured (`engine.cpu.candidates`:
    runtime, file, precision), the chosen one marked."""
    found: list[Target] = []
    for target in map(Path, targets):
        paths = model_paths([target])
        if target.is_dir() and backend == "auto":
            found += _with_cpu_candidates(
                target, [Target(p, FILE_BACKENDS.get(p.name, "auto")) for p in paths]
            )
            found += _pair_generations(target)
        else:
            found += [Target(p, backend) for p in paths]
    return found


def _with_cpu_candidates(out_dir: Path, found: list[Target]) -> list[Target]:
    from engines.openvino_runner import openvino_unavailable_reason

    cpu = cpu_selection.recorded_choice(out_dir)
    why_not_ov = openvino_unavailable_reason()
    if why_not_ov is not None:  # the OpenVINO file and candidates are left out, and that is said
        dropped = [t for t in found if _resolved(t) == "openvino"]
        if dropped or (cpu and any(r["engine"] == "openvino" for r in cpu.get("candidates", []))):
            logger.warning("engine-bench: OpenVINO variants left out: %s", why_not_ov)
        found = [t for t in found if _resolved(t) != "openvino"]
    if not cpu:
        return found
    for row in cpu.get("candidates", []):
        if row.get("error") or (row["engine"] == "openvino" and why_not_ov is not None):
            continue
        path = out_dir / row["file"]
        label = f"{row['file']} [{row['name']}]" + (" (chosen CPU engine)" if row.get("chosen") else "")
        target = Target(
            path, row["engine"], row.get("engine_precision") if row["engine"] == "openvino" else None, label
        )
        same = next((i for i, t in enumerate(found) if _key(t) == _key(target)), None)
        if same is None:
            found.append(target)
        else:
            found[same] = target
    return found


def _pair_generations(out_dir: Path) -> list[Target]:
    """The export's prefill/decode pair and its decode file alone, each as one generation per query."""
    pair = recorded_pair(out_dir)
    if pair is None or not all(p.is_file() for p in pair):
        return []
    prefill, decode = pair
    steps = DEFAULT_STEPS
    return [
        Target(decode, "onnxruntime", None, f"generation, pair: prompt {prefill.name} + {steps} steps {decode.name}",
               steps, prefill),
        Target(decode, "onnxruntime", None, f"generation: prompt + {steps} steps {decode.name}", steps),
    ]  # fmt: skip


def _key(target: Target) -> tuple[Path, str, str | None]:
    """What a variant runs: file, runtime and precision (OpenVINO's default precision is f32)."""
    backend = _resolved(target)
    return target.path, backend, (target.precision or "f32") if backend == "openvino" else None


def _resolved(target: Target) -> str:
    if target.backend != "auto":
        return target.backend
    readers = engines.READERS.get(target.path.suffix, ("?",))
    return readers[0]


def model_paths(targets: Sequence[str | Path]) -> list[Path]:
    """Expand an export OUT_DIR into its .onnx stage models (known stages first); check files exist."""
    paths: list[Path] = []
    for target in map(Path, targets):
        if target.is_dir():
            found = sorted(target.glob("*.onnx"), key=_stage_key)
            if not found:
                raise InputError(target, "no .onnx model in this folder")
            paths.extend(found)
        elif not target.is_file():
            raise InputError(target, "no such file or folder")
        elif target.suffix not in (".onnx", ".plan", ".engine"):
            raise InputError(target, "expected a .onnx or .plan file, or an export folder")
        else:
            paths.append(target)
    return paths


def _stage_key(path: Path) -> tuple[int, str]:
    rank = STAGE_ORDER.index(path.name) if path.name in STAGE_ORDER else len(STAGE_ORDER)
    return rank, path.name


def _feeds_for(path: Path, runner: Any, options: BenchOptions) -> dict[str, Any]:
    specs = runner.input_specs
    if options.load_inputs is not None:
        return bench_inputs.load_feeds(options.load_inputs, specs)
    shapes = bench_inputs.resolve_shapes(specs, options.shapes)
    needs_vocab = any(spec.name == "input_ids" for spec in specs)
    vocab = bench_inputs.vocab_size(path) if needs_vocab else None
    if needs_vocab and vocab is None:
        raise InputError(
            path,
            "cannot tell the vocabulary size (no embedding on input_ids, no config.json); "
            "pass --loadInputs=FILE.npz",
        )
    return bench_inputs.make_feeds(specs, shapes, vocab, seed=options.seed)


def benchmark_models(
    targets: Sequence[Path | Target], options: BenchOptions, progress: benchmark.Progress | None = None
) -> list[BenchResult]:
    """Load every model, make (or load) its feeds, and time them all interleaved in this process."""
    found = [t if isinstance(t, Target) else Target(t, options.backend) for t in targets]
    names = _display_names(found)
    with contextlib.ExitStack() as stack:
        variants = []
        for name, target in zip(names, found):
            path = target.path
            # interleaved variants share the cores: an idle ORT pool spinning would slow the others
            runner = engines.load_runner(
                path,
                backend=target.backend,
                threads=options.threads,
                spinning=len(found) == 1,
                precision=target.precision,
            )
            if target.generation_steps:
                prefill = target.prefill
                runner = GenerationRunner(
                    runner,
                    None
                    if prefill is None
                    else engines.load_runner(prefill, "onnxruntime", options.threads, False),
                    target.generation_steps,
                )
            runner = stack.enter_context(runner)
            variants.append(Variant(name, runner, _feeds_for(path, runner, options)))
        return benchmark.run_interleaved(variants, options.config, progress)


def _display_names(items: Sequence[Path | Target]) -> list[str]:
    targets = [t if isinstance(t, Target) else Target(t) for t in items]
    names = [t.label or _name(t, t.path.name) for t in targets]
    if len(set(names)) == len(names):
        return names
    return [t.label or _name(t, str(t.path)) for t in targets]


def _name(target: Target, base: str) -> str:
    """The file name, with the runtime where it is not the suffix's default (`model.int8.onnx [openvino]`)."""
    backend = _resolved(target)
    default = engines.READERS.get(target.path.suffix, ("?",))[0]
    if backend == default and target.precision is None:
        return base
    return f"{base} [{backend}{'-' + target.precision if target.precision else ''}]"


# ---------------------------------------------------------------- printing (trtexec's layout)


def perf_string(summary: stats.Summary) -> str:
    """trtexec's `toPerfString`; numbers printed as C++ ostream does by default (6 significant digits)."""
    text = (
        f"min = {summary.min:g} ms, max = {summary.max:g} ms, mean = {summary.mean:g} ms, "
        f"median = {summary.median:g} ms"
    )
    for p, value in summary.percentiles.items():
        text += f", percentile({stats.format_percent(p)}%) = {value:g} ms"
    return text


def shapes_spec(shapes: dict[str, tuple[int, ...]]) -> str:
    """The inverse of --shapes: `input_ids:1x128,attention_mask:1x128`."""
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes.items())


def prolog_lines(result: BenchResult) -> list[str]:
    lines = [
        f"Warmup completed {result.warmup_queries} queries over {result.warmup_ms:g} ms",
        f"Timing trace has {len(result.iterations)} queries over {result.walltime_ms / 1000:g} s",
        "",
        "=== Trace details ===",
        f"Trace averages of {result.config.avg_runs} runs:",
    ]
    n = result.config.avg_runs
    for avg in result.averages():
        lines.append(f"Average on {n} runs - Host latency: {avg:g} ms")
    return lines


def summary_lines(result: BenchResult) -> list[str]:
    """The `=== Performance summary ===` block; GPU lines only when the runner measured them."""
    lines = [
        "=== Performance summary ===",
        f"Throughput: {result.throughput_qps:g} qps",
        f"Latency: {perf_string(result.latency())}",
    ]
    for label, field in (
        ("Enqueue Time", "enqueue_ms"),
        ("H2D Latency", "h2d_ms"),
        ("GPU Compute Time", "compute_ms"),
        ("D2H Latency", "d2h_ms"),
    ):
        device = result.device_summary(field)
        if device is not None:
            lines.append(f"{label}: {perf_string(device)}")
    lines.append(f"Total Host Walltime: {result.walltime_ms / 1000:g} s")
    total_gpu_ms = result.total_gpu_compute_ms()
    if total_gpu_ms is not None:
        lines.append(f"Total GPU Compute Time: {total_gpu_ms / 1000:g} s")
    return lines


def warning_lines(result: BenchResult) -> list[str]:
    """trtexec's warnings: bound-by-enqueue/transfers on GPU, unstable timings (CoV > 1%)."""
    compute = result.device_summary("compute_ms")
    if compute is not None:
        return _gpu_warnings(result, compute)
    cov = result.latency().cov_percent
    if cov <= stats.UNSTABLE_COV_PERCENT:
        return []
    return [
        f"* Latency is unstable, with coefficient of variation = {cov:g}%.",
        "  Other processes on these cores, frequency scaling or a --threads count above the free cores may "
        "cause this; compare variants interleaved (--compare) and read medians and ratios.",
    ]


def _gpu_warnings(result: BenchResult, compute: stats.Summary) -> list[str]:
    lines = []
    enqueue = result.device_summary("enqueue_ms")
    if enqueue is not None and enqueue.median > ENQUEUE_BOUND_THRESHOLD * compute.median:
        lines.append(
            "* Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may be "
            "under-utilized."
        )
    for field, what in (
        ("h2d_ms", "host-to-device transfers for the inputs"),
        ("d2h_ms", "device-to-host transfers for the outputs"),
    ):
        transfer = result.device_summary(field)
        if transfer is not None and transfer.median >= compute.median:
            lines.append(
                f"* Throughput may be bound by {what} rather than GPU Compute and the GPU may be "
                "under-utilized."
            )
    if compute.cov_percent > stats.UNSTABLE_COV_PERCENT:
        lines.append(
            f"* GPU compute time is unstable, with coefficient of variance = {compute.cov_percent:g}%."
        )
        lines.append("  If not already in use, locking GPU clock frequency may improve the stability.")
    return lines


def comparison_lines(results: Sequence[BenchResult]) -> list[str]:
    """A Markdown table of the interleaved variants with ratios to the first."""
    ref = results[0].latency()
    lines = [
        f"=== Comparison ({len(results)} variants interleaved, ratios to {results[0].name}) ===",
        "| variant | backend | median ms | p90 ms | mean ms | CoV % | qps | median ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lat = result.latency()
        p90 = lat.percentiles.get(
            90.0, stats.percentile(sorted(it.latency_ms for it in result.iterations), 90)
        )
        lines.append(
            f"| {result.name} | {result.backend} | {lat.median:.3f} | {p90:.3f} | {lat.mean:.3f} | "
            f"{lat.cov_percent:.1f} | {result.throughput_qps:.2f} | {lat.median / ref.median:.3f}x |"
        )
    return lines


def report_dict(
    results: Sequence[BenchResult], targets: Sequence[Path | Target], options: BenchOptions
) -> dict[str, Any]:
    """The `--exportJson` / `--json` document."""
    ref = results[0].latency().median
    variants = []
    for result, target in zip(results, targets):
        path = target.path if isinstance(target, Target) else target
        entry = result.to_dict() | {"path": str(path), "medianRatioToFirst": result.latency().median / ref}
        entry["warnings"] = warning_lines(result)
        variants.append(entry)
    return {
        "tool": "engine-bench",
        "shapes": {k: list(v) for k, v in options.shapes.items()},
        "threads": options.threads,
        "variants": variants,
    }


def times_records(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """The `--exportTimes` list: one object per timed query (startMs, endMs, latencyMs, ...)."""
    records = []
    for result in results:
        for it in result.iterations:
            record: dict[str, Any] = it.to_dict()
            if len(results) > 1:
                record["variant"] = result.name
            records.append(record)
    return records


# ---------------------------------------------------------------- flags


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise InputError("engine-bench", message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="engine-bench", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "path", nargs="?", help=".onnx or .plan model, or an export OUT_DIR (all its .onnx stages)"
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="MODEL",
        default=[],
        help="models to time interleaved in one process; ratios are to the first",
    )
    p.add_argument("--shapes", default="", help="input shapes, e.g. input_ids:8x128,attention_mask:8x128")
    p.add_argument(
        "--warmUp",
        type=float,
        default=200.0,
        metavar="MS",
        help="run for N milliseconds to warm up before measuring (default 200)",
    )
    p.add_argument(
        "--iterations", type=int, default=10, metavar="N", help="run at least N iterations (default 10)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=3.0,
        metavar="S",
        help="measure for at least N seconds of wallclock time (default 3)",
    )
    p.add_argument(
        "--avgRuns",
        type=int,
        default=10,
        metavar="N",
        help="report averages over N consecutive iterations (default 10)",
    )
    p.add_argument(
        "--percentile",
        default="90,95,99",
        metavar="P[,P...]",
        help="latency percentiles to report, in [0, 100] (default 90,95,99)",
    )
    p.add_argument(
        "--exportTimes", type=Path, metavar="FILE", help="write per-iteration times as a JSON list"
    )
    p.add_argument("--exportJson", type=Path, metavar="FILE", help="write the performance summary as JSON")
    p.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "openvino", "tensorrt"),
        default="auto",
        help="runtime: auto (.onnx -> ONNX Runtime, .xml -> OpenVINO, .plan -> TensorRT; an export folder "
        "adds the CPU engine candidates its report measured), onnxruntime, openvino or tensorrt",
    )
    p.add_argument(
        "--threads", type=int, metavar="N", help="intra-op threads (ONNX Runtime); default: runtime's"
    )
    p.add_argument(
        "--loadInputs", type=Path, metavar="FILE.npz", help="inputs from an .npz keyed by input name"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random default inputs (default 0)")
    p.add_argument("--quiet", action="store_true", help="print only the performance summary (and comparison)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout, nothing else")
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    try:
        config = BenchConfig(
            warmup_ms=args.warmUp,
            iterations=args.iterations,
            duration_s=args.duration,
            avg_runs=args.avgRuns,
            percentiles=_parse_percentiles(args.percentile),
        )
    except ValueError as exc:
        raise InputError("engine-bench", str(exc)) from None
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads", f"must be >= 1, got {args.threads}")
    if args.loadInputs is not None and not args.loadInputs.is_file():
        raise InputError(args.loadInputs, "no such file (--loadInputs)")
    return BenchOptions(
        config=config,
        shapes=bench_inputs.parse_shapes(args.shapes),
        backend=args.backend,
        threads=args.threads,
        load_inputs=args.loadInputs,
        seed=args.seed,
    )


def _parse_percentile_item(item: str) -> float:
    try:
        return float(item)
    except ValueError:
        raise InputError("--percentile", f"{item!r} is not a number") from None


def _parse_percentiles(spec: str) -> tuple[float, ...]:
    values = tuple(_parse_percentile_item(s.strip()) for s in spec.split(",") if s.strip())
    if not values:
        raise InputError("--percentile", "give at least one percentile, e.g. 90,95,99")
    return values


# ---------------------------------------------------------------- main


def _progress_bar(args: argparse.Namespace) -> tuple[Callable[[float], None] | None, Callable[[], None]]:
    if args.quiet or args.json or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=100, desc="benchmark", unit="%", leave=False, file=sys.stderr)

    def update(fraction: float) -> None:
        bar.n = int(min(fraction, 1.0) * 100)
        bar.refresh()

    return update, bar.close


def _print_text(
    results: Sequence[BenchResult], targets: Sequence[Target], args: argparse.Namespace, out: TextIO
) -> None:
    for result, path in zip(results, (t.path for t in targets)):
        if len(results) > 1:
            print(f"=== {result.name} ===", file=out)
        if not args.quiet:
            print(f"Model: {path} (backend {result.backend})", file=out)
            print(f"Shapes: {shapes_spec(result.input_shapes)}", file=out)
            print("\n".join(prolog_lines(result)), file=out)
            print(file=out)
        print("\n".join(summary_lines(result)), file=out)
        for line in warning_lines(result):
            print(f"[W] {line}", file=out)
        print(file=out)
    if len(results) > 1:
        print("\n".join(comparison_lines(results)), file=out)


def run_cli(args: argparse.Namespace, out: TextIO) -> None:
    options = options_from_args(args)
    targets = ([args.path] if args.path else []) + list(args.compare)
    if not targets:
        raise InputError("engine-bench", "give a model (.onnx/.plan), an export folder, or --compare A B ...")
    paths = model_targets(targets, options.backend)
    progress, close = _progress_bar(args)
    try:
        results = benchmark_models(paths, options, progress)
    finally:
        close()
    report = report_dict(results, paths, options)
    if args.exportJson:
        args.exportJson.write_text(json.dumps(report, indent=2) + "\n")
    if args.exportTimes:
        args.exportTimes.write_text(json.dumps(times_records(results), indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    else:
        _print_text(results, paths, args, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: typed errors become one line on stderr and their exit code (2 for bad input)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_cli(build_parser().parse_args(argv), sys.stdout)
    except ExportEngineError as exc:
        print(f"engine-bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"engine-bench: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a backend failing at run time (e.g. ONNX Runtime refusing the feeds): one line
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"engine-bench: error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
