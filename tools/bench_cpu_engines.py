"""The CPU engines of an export side by side (a benchmark, not a test): the chosen one vs today's, and the peer.

Variants on an export folder (those whose file and runtime exist here):
  ORT INT8    model.int8.cpu.onnx on ONNX Runtime (the CPU engine before the choice), as OnnxRuntimeRunner runs it
  chosen      what report.json's engine.cpu names, opened as the runtime API opens it (chosen_runner)
  chosen, f32 hint   the same OpenVINO file with OpenVINO's f32 inference precision (where the choice is bf16:
              what the bf16 hint on its float layers buys)
  OV Q/DQ recipe     the OpenVINO file as built without NNCF (exporter/quantize/openvino_int8.py's Q/DQ recipe,
              built here from model.int8.onnx when the export used NNCF's)
  OV Q/DQ     model.int8.onnx, the TensorRT Q/DQ file as is, on OpenVINO
  OV static   the chosen OpenVINO file compiled for the benchmark's fixed shape (OpenVINO's static shapes)
  ORT+OV EP   the chosen OpenVINO file through ONNX Runtime's OpenVINO execution provider plugin
              (onnxruntime-ep-openvino), where installed
  NNCF PTQ    the peer a CPU user would pick: nncf.quantize (transformer preset) of the compact
              model.exported.onnx read as OpenVINO IR, calibrated here on the export's calibration samples
              (same corpus, same split), compiled as a user would (OpenVINO's default precision: bf16 on
              AVX512-BF16/AMX CPUs) and with the f32 hint; where nncf is installed (--no-nncf leaves it out)
  OV bf16 / OV fp32  model.exported.onnx with the bf16 / f32 hint;  ORT fp32  model.onnx
  with --explore, what else might make OpenVINO faster: its dynamic quantization of fully connected
  layers (weights compressed to INT8 by nncf.compress_weights, activations quantized per group of 32 at
  run time: DYNAMIC_QUANTIZATION_GROUP_SIZE) on the fp32 graph, and CPU_DENORMALS_OPTIMIZATION on the chosen file
Three measuring methods, each the same for every variant:
  interleaved  one process, every variant once per round (ORT's thread spinning off), median per variant:
               how the export's stage table and CPU engine choice measure;
  bursts       one process, every variant 3 queries per round, the first not recorded, ORT spinning on (tried
               as a fairer interleaving for ORT, and dropped: its spinning outlasts one query and slows the
               variant after it);
  isolated     every variant alone in its own process (ORT spinning on, its default), the processes
               alternating variant by variant, --processes times; the median of the per-process medians.
Accuracy: mean token cosine (real tokens) vs ORT fp32 `model.onnx` on the export's 64 held-out English
sentences (the calibration corpus's held-out split, as the export splits it: disjoint from the samples
every INT8 variant was calibrated on), the INT8 gate's statistic.

Usage: PYTHONPATH=. HF_HUB_OFFLINE=1 python tools/bench_cpu_engines.py OUT_DIR [--model-dir DIR]
       [--threads 2] [--batches 1 8] [--seq 128] [--rounds 40] [--processes 3] [--mode all] [--explore]
       [--no-nncf] [--build-only] [--only TEXT ...]
Build (NNCF's quantize, the Q/DQ recipe file) under the shared CPU lock with --build-only, then time under the
exclusive one: files built for this OUT_DIR are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engines import bench_inputs
from engines.base import Runner
from engines.cpu_selection import (
    bf16_unsupported_reason,
    chosen_runner,
    cpu_flags,
    cpu_kind,
    int8_engine_precision,
    recorded_choice,
)
from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.openvino_runner import OpenVinoRunner, openvino_unavailable_reason

Factory = Callable[[bool, tuple[int, int]], Runner]  # (interleaved, (batch, seq)) -> runner (not entered)


BASE = "ORT INT8 model.int8.cpu.onnx (before)"  # today's CPU engine: the ratios' denominator
REFERENCE = "ORT fp32 model.onnx"  # the cosine's reference
CALIBRATION_SAMPLES, HELDOUT = 128, 64  # the export's defaults: the same split as the export's
WORK = Path(tempfile.gettempdir()) / "bench_cpu_engines"  # files built here (NNCF IR, the Q/DQ recipe)


def variants(
    out: Path,
    threads: int,
    explore: bool = False,
    nncf_ir: Path | None = None,
    qdq_recipe: Path | None = None,
) -> dict[str, Factory]:
    """Name -> runner factory, for what exists here."""
    found: dict[str, Factory] = {}
    cpu = recorded_choice(out) or {}
    chosen = f"chosen: {cpu.get('candidate')} ({cpu.get('file')}, {cpu.get('engine_precision') or 'default'})"

    def ort(name: str) -> Factory:
        return lambda interleaved, _: OnnxRuntimeRunner(out / name, threads=threads, spinning=not interleaved)

    def ov(name: str, static: bool = False) -> Factory:
        def make(_: bool, shape: tuple[int, int]) -> Runner:
            return (
                StaticOpenVino(out / name, threads, shape)
                if static
                else OpenVinoRunner(out / name, threads=threads)
            )

        return make

    found[BASE] = ort("model.int8.cpu.onnx")
    if cpu:
        found[chosen] = lambda interleaved, _: _spinning(chosen_runner(out, threads), not interleaved)
    if openvino_unavailable_reason() is None:
        ov_file = out / "model.int8.openvino.onnx"
        bf16 = bf16_unsupported_reason(cpu_flags()) is None
        int8_hint = int8_engine_precision(cpu_flags())  # what the export gives OpenVINO's INT8 candidate
        chosen_key = (
            (cpu.get("file"), cpu.get("engine_precision")) if cpu.get("engine") == "openvino" else None
        )
        if ov_file.is_file():
            for hint in ("bf16", "f32") if bf16 else ("f32",):
                if chosen_key != (ov_file.name, hint):
                    found[f"OV INT8 {ov_file.name}, {hint} hint"] = _ov_hint(ov_file, threads, hint)
        if qdq_recipe is not None:
            found[f"OV INT8, Q/DQ recipe (no NNCF), {int8_hint} hint"] = _ov_hint(
                qdq_recipe, threads, int8_hint
            )
        found["OV Q/DQ model.int8.onnx, f32 hint"] = ov("model.int8.onnx")
        if ov_file.is_file():
            found[f"OV INT8, static shapes, {int8_hint} hint"] = lambda _, shape: StaticOpenVino(
                ov_file, threads, shape, int8_hint
            )
            if _ep_available():
                found["ORT + OpenVINO EP, model.int8.openvino.onnx"] = lambda _, __: OpenVinoEp(
                    ov_file, threads
                )
        if nncf_ir is not None:
            found["NNCF PTQ (OpenVINO IR), OpenVINO's default precision"] = lambda _, __: OpenVinoRunner(
                nncf_ir, threads=threads, properties={"INFERENCE_PRECISION_HINT": _default_precision()}
            )
            found["NNCF PTQ (OpenVINO IR), f32 hint"] = lambda _, __: OpenVinoRunner(nncf_ir, threads=threads)
        if bf16 and chosen_key != ("model.exported.onnx", "bf16"):
            found["OV bf16 model.exported.onnx"] = _ov_hint(out / "model.exported.onnx", threads, "bf16")
        found["OV fp32 model.exported.onnx"] = ov("model.exported.onnx")
        if explore:
            found["OV dynamic quantization of FC (nncf INT8 weights, group 32)"] = lambda _, __: (
                DynamicQuantOpenVino(out / "model.exported.onnx", threads)
            )
            found["OV INT8 + CPU_DENORMALS_OPTIMIZATION"] = lambda _, __: OpenVinoRunner(
                out / "model.int8.openvino.onnx",
                threads=threads,
                properties={"CPU_DENORMALS_OPTIMIZATION": True},
            )
    found[REFERENCE] = ort("model.onnx")
    return found


def _ov_hint(path: Path, threads: int, hint: str) -> Factory:
    return lambda _, __: OpenVinoRunner(path, threads=threads, precision=hint)


def _default_precision() -> object:
    """OpenVINO's own default inference precision on this CPU (bf16 on AVX512-BF16/AMX CPUs), as a user
    compiling without the hint gets it (an `openvino.Type`, passed back as the property)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")


def calibration(out: Path, model_dir: Path, seq: int):  # type: ignore[no-untyped-def]
    """The export's calibration / held-out split of the default corpus (CalibrationData)."""
    import onnx

    from exporter.quantize.calibration import load_calibration

    names = [i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.input]
    return load_calibration(
        None, model_dir, names, batch=8, seq_len=seq, num_samples=CALIBRATION_SAMPLES, num_heldout=HELDOUT
    )


def build_nncf_ir(out: Path, data) -> Path | None:  # type: ignore[no-untyped-def]
    """NNCF PTQ (transformer preset) of model.exported.onnx read as OpenVINO IR, as a CPU user would run it;
    None where nncf is not installed."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        print(f"NNCF PTQ left out: {exc} (pip install -e .[bench])")
        return None
    path = WORK / "nncf_ptq.xml"
    if _fresh(path, out / "model.exported.onnx"):
        return path
    start = time.perf_counter()
    model = ov.Core().read_model(str(out / "model.exported.onnx"))
    samples = list(data.batches("calibration"))
    quantized = nncf.quantize(
        model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples)
    )
    WORK.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(path))
    _stamp(path, out / "model.exported.onnx")
    print(f"NNCF PTQ: nncf.quantize {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


def build_qdq_recipe(out: Path, report: dict) -> Path | None:  # type: ignore[type-arg]
    """The OpenVINO file as the export writes it without NNCF, when the export used NNCF's recipe."""
    from exporter.quantize.openvino_int8 import build_openvino_file

    if report.get("int8", {}).get("openvino", {}).get("recipe") != "nncf":
        return None
    path = WORK / "model.int8.openvino.qdq.onnx"
    if not _fresh(path, out / "model.int8.onnx"):
        WORK.mkdir(parents=True, exist_ok=True)
        build_openvino_file(out / "model.int8.onnx", path)
        _stamp(path, out / "model.int8.onnx")
    return path


def _fresh(built: Path, source: Path) -> bool:
    """`built` exists and was built from this `source` (newer than it, and recorded for it)."""
    stamp = built.with_suffix(built.suffix + ".from")
    return (
        built.is_file()
        and stamp.is_file()
        and stamp.read_text() == str(source.resolve())
        and built.stat().st_mtime > source.stat().st_mtime
    )


def _stamp(built: Path, source: Path) -> None:
    built.with_suffix(built.suffix + ".from").write_text(str(source.resolve()))


class DynamicQuantOpenVino(OpenVinoRunner):
    """OpenVINO's own dynamic INT8: weights compressed to INT8 per channel (nncf.compress_weights), and the
    CPU plugin quantizes each fully connected layer's activations per group at run time."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__(path, threads=threads, properties={"DYNAMIC_QUANTIZATION_GROUP_SIZE": 32})

    def _activate(self) -> None:
        import nncf
        import openvino as ov

        core = ov.Core()
        model = nncf.compress_weights(core.read_model(str(self.path)), mode=nncf.CompressWeightsMode.INT8_SYM)
        compiled = core.compile_model(model, "CPU", self.compile_properties())
        self._request = compiled.create_infer_request()
        self._output_names = [o.get_any_name() for o in compiled.outputs]
        from engines.openvino_runner import _specs

        self._inputs, self._outputs = _specs(self.path, compiled)


def _spinning(runner: Runner, spinning: bool) -> Runner:
    if isinstance(runner, OnnxRuntimeRunner):
        runner.spinning = spinning
    return runner


class StaticOpenVino(OpenVinoRunner):
    """OpenVINO compiled for one input shape (reshaped before compiling): its static-shape kernels."""

    def __init__(self, path: Path, threads: int, shape: tuple[int, int], precision: str = "f32") -> None:
        super().__init__(path, threads=threads, precision=precision)
        self.shape = shape

    def _activate(self) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.path))
        model.reshape({port.get_any_name(): list(self.shape) for port in model.inputs})
        compiled = core.compile_model(model, "CPU", self.compile_properties())
        self._request = compiled.create_infer_request()
        self._output_names = [o.get_any_name() for o in compiled.outputs]
        from engines.openvino_runner import _specs

        self._inputs, self._outputs = _specs(self.path, compiled)


def _ep_available() -> bool:
    try:
        import onnxruntime_ep_openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoEp(OnnxRuntimeRunner):
    """ONNX Runtime with the OpenVINO execution provider plugin (registered once per process)."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__(path, threads=threads, spinning=False)

    def _activate(self) -> None:
        import onnxruntime as ort
        import onnxruntime_ep_openvino as ep

        if not any(d.ep_name == ep.get_ep_name() for d in ort.get_ep_devices()):
            ort.register_execution_provider_library(ep.get_ep_name(), ep.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == ep.get_ep_name()]
        if not devices:
            raise RuntimeError("the OpenVINO execution provider lists no device on this CPU")
        options = self._session_options()
        config = {"CPU": {"INFERENCE_NUM_THREADS": str(self.threads), "PERFORMANCE_HINT": "LATENCY"}}
        options.add_provider_for_devices(devices, {"load_config": json.dumps(config)})
        self._session = ort.InferenceSession(str(self.path), sess_options=options)
        from engines.onnxruntime_runner import _spec

        self._inputs = [_spec(a) for a in self._session.get_inputs()]
        self._outputs = [_spec(a) for a in self._session.get_outputs()]


def feeds_for(runner: Runner, path: Path, batch: int, seq: int) -> dict[str, np.ndarray]:
    specs = runner.input_specs
    shapes = bench_inputs.resolve_shapes(specs, {"input_ids": (batch, seq)})
    return bench_inputs.make_feeds(specs, shapes, bench_inputs.vocab_size(path), seed=0)


def time_interleaved(
    runners: dict[str, Runner], out: Path, batch: int, seq: int, rounds: int, burst: int = 1
) -> dict[str, float]:
    feeds = {name: feeds_for(r, out / "model.onnx", batch, seq) for name, r in runners.items()}
    for name, runner in runners.items():
        for _ in range(3):
            runner.infer(feeds[name])
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            for query in range(burst):
                start = time.perf_counter()
                runner.infer(feeds[name])
                if query or burst == 1:  # in a burst, the first query pays for the previous one's spinning
                    samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(s) for name, s in samples.items()}


def cosines(runners: dict[str, Runner], data) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from exporter.quantize.int8 import token_cosines

    batches = list(data.batches("heldout"))
    reference = runners[REFERENCE]
    result = {}
    for name, runner in runners.items():
        scores = [
            token_cosines(
                reference.infer(b)["last_hidden_state"],
                runner.infer(b)["last_hidden_state"],
                b["attention_mask"],
            )
            for b in batches
        ]
        result[name] = float(np.mean(np.concatenate(scores)))
    return result


def child(args: argparse.Namespace) -> None:
    """One variant alone in this process: print its median (ms) at each batch."""
    factory = variants(args.out_dir, args.threads, args.explore, *_built(args))[args.child]
    medians = {}
    for batch in args.batches:
        with factory(False, (batch, args.seq)) as runner:
            medians[batch] = time_interleaved(
                {args.child: runner}, args.out_dir, batch, args.seq, args.rounds
            )[args.child]
    print(json.dumps(medians))


def _built(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """In a child process: the files the parent built (same paths)."""
    nncf_ir = WORK / "nncf_ptq.xml"
    qdq = WORK / "model.int8.openvino.qdq.onnx"
    return (None if args.no_nncf or not nncf_ir.is_file() else nncf_ir), (qdq if qdq.is_file() else None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model-dir", type=Path, help="MODEL_DIR for the tokenizer (default: the report's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--processes", type=int, default=3, help="isolated mode: processes per variant")
    parser.add_argument("--mode", choices=["interleaved", "bursts", "isolated", "all"], default="all")
    parser.add_argument("--explore", action="store_true", help="also OpenVINO's other settings (see above)")
    parser.add_argument("--no-nncf", action="store_true", help="leave NNCF's PTQ model out")
    parser.add_argument(
        "--build-only", action="store_true", help="build the files (shared lock), time nothing"
    )
    parser.add_argument(
        "--only", nargs="+", help="variants whose name contains one of these (the 'before' baseline is kept)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    report = json.loads((args.out_dir / "report.json").read_text())
    model_dir = args.model_dir or Path(report["model_dir"])
    data = calibration(args.out_dir, model_dir, args.seq)
    nncf_ir = None if args.no_nncf or openvino_unavailable_reason() else build_nncf_ir(args.out_dir, data)
    qdq_recipe = build_qdq_recipe(args.out_dir, report) if openvino_unavailable_reason() is None else None
    if args.build_only:
        print(f"built: {nncf_ir}, {qdq_recipe}")
        return
    found = variants(args.out_dir, args.threads, args.explore, nncf_ir, qdq_recipe)
    if args.only:
        found = {k: v for k, v in found.items() if k in (BASE, REFERENCE) or any(t in k for t in args.only)}
    tables: dict[str, dict[int, dict[str, float]]] = {}
    accuracy: dict[str, float] = {}
    for mode, burst in (("interleaved", 1), ("bursts", 3)):
        if args.mode not in (mode, "all"):
            continue
        tables[mode] = {}
        for batch in args.batches:
            # plain round-robin needs ORT's spinning off; in bursts it spins, as deployed
            runners = {name: make(burst == 1, (batch, args.seq)).__enter__() for name, make in found.items()}
            tables[mode][batch] = time_interleaved(runners, args.out_dir, batch, args.seq, args.rounds, burst)
            if not accuracy:
                accuracy = cosines({n: r for n, r in runners.items() if "static" not in n}, data)
            for runner in runners.values():
                runner.__exit__()
    if args.mode in ("isolated", "all"):
        tables["isolated"] = {}
        per: dict[str, list[dict[str, float]]] = {name: [] for name in found}
        for _ in range(args.processes):
            for name in found:
                cmd = [
                    sys.executable,
                    __file__,
                    str(args.out_dir),
                    "--child",
                    name,
                    "--threads",
                    str(args.threads),
                ]
                cmd += [
                    "--seq",
                    str(args.seq),
                    "--rounds",
                    str(args.rounds),
                    "--batches",
                    *map(str, args.batches),
                ]
                cmd += ["--explore"] if args.explore else []
                cmd += ["--no-nncf"] if nncf_ir is None else []
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                per[name].append(
                    {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
                )
        for batch in args.batches:
            tables["isolated"][batch] = {
                name: statistics.median(run[batch] for run in runs) for name, runs in per.items()
            }
    _table(found, args, tables, accuracy)


def _table(found, args, tables, accuracy) -> None:  # type: ignore[no-untyped-def]
    base = BASE
    cols, header = [], []
    for batch in args.batches:
        for mode, table in tables.items():
            cols.append((batch, table))
            header.append(f"{batch}×{args.seq} {mode} ms (× vs before)")
    print(f"\nCPU flags: {cpu_kind(cpu_flags())}")
    print(
        f"{args.threads} threads; interleaved and bursts: {args.rounds} rounds, medians; isolated: "
        f"{args.processes} processes per variant, median of medians\n"
    )
    print("| variant | " + " | ".join(header) + " | mean token cosine vs fp32 |")
    print("|---|" + "---:|" * (len(header) + 1))
    for name in found:
        cells = [
            f"{table[batch][name]:.2f} ({table[batch][base] / table[batch][name]:.2f}×)"
            for batch, table in cols
        ]
        cos = accuracy.get(name)
        print(f"| {name} | " + " | ".join(cells) + f" | {'—' if cos is None else f'{cos:.4f}'} |")


if __name__ == "__main__":
    main()
