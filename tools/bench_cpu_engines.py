"""The CPU engines of an export side by side (a benchmark, not a test): the chosen one vs today's.

Variants on an export folder (those whose file and runtime exist here):
  ORT INT8    model.int8.cpu.onnx on ONNX Runtime (the CPU engine before the choice), as OnnxRuntimeRunner runs it
  chosen      what report.json's engine.cpu names, opened as the runtime API opens it (chosen_runner)
  OV Q/DQ     model.int8.onnx, the TensorRT Q/DQ file as is, on OpenVINO
  OV INT8     model.int8.openvino.onnx on OpenVINO (the same as "chosen" when OpenVINO won: then left out)
  OV static   the chosen OpenVINO file compiled for the benchmark's fixed shape (OpenVINO's static shapes)
  ORT+OV EP   model.int8.openvino.onnx through ONNX Runtime's OpenVINO execution provider plugin
              (onnxruntime-ep-openvino), where installed
  ORT fp32    model.onnx;  OV fp32  model.exported.onnx
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
Accuracy: mean token cosine (real tokens) vs ORT fp32 `model.onnx` on held-out English sentences
(the calibration corpus's held-out split, tokenized with the MODEL_DIR's tokenizer), the INT8 gate's statistic.

Usage: PYTHONPATH=. HF_HUB_OFFLINE=1 python tools/bench_cpu_engines.py OUT_DIR [--model-dir DIR]
       [--threads 2] [--batches 1 8] [--seq 128] [--rounds 40] [--processes 3] [--mode all] [--explore]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engines import bench_inputs
from engines.base import Runner
from engines.cpu_selection import chosen_runner, recorded_choice
from engines.onnxruntime_runner import OnnxRuntimeRunner
from engines.openvino_runner import OpenVinoRunner, openvino_unavailable_reason

Factory = Callable[[bool, tuple[int, int]], Runner]  # (interleaved, (batch, seq)) -> runner (not entered)


def variants(out: Path, threads: int, explore: bool = False) -> dict[str, Factory]:
    """Name -> runner factory, for what exists here."""
    found: dict[str, Factory] = {}
    cpu = recorded_choice(out) or {}
    chosen = f"chosen: {cpu.get('candidate')} ({cpu.get('file')})"

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

    found["ORT INT8 model.int8.cpu.onnx (before)"] = ort("model.int8.cpu.onnx")
    if cpu:
        found[chosen] = lambda interleaved, _: _spinning(chosen_runner(out, threads), not interleaved)
    if openvino_unavailable_reason() is None:
        found["OV Q/DQ model.int8.onnx"] = ov("model.int8.onnx")
        if cpu.get("file") != "model.int8.openvino.onnx" and (out / "model.int8.openvino.onnx").is_file():
            found["OV INT8 model.int8.openvino.onnx"] = ov("model.int8.openvino.onnx")
        if (out / "model.int8.openvino.onnx").is_file():
            found["OV INT8, static shapes"] = ov("model.int8.openvino.onnx", static=True)
            if _ep_available():
                found["ORT + OpenVINO EP, model.int8.openvino.onnx"] = lambda _, __: OpenVinoEp(
                    out / "model.int8.openvino.onnx", threads
                )
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
    found["ORT fp32 model.onnx"] = ort("model.onnx")
    return found


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

    def __init__(self, path: Path, threads: int, shape: tuple[int, int]) -> None:
        super().__init__(path, threads=threads)
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


def cosines(runners: dict[str, Runner], model_dir: Path, seq: int) -> dict[str, float]:
    from exporter.quantize.calibration import load_calibration
    from exporter.quantize.int8 import token_cosines

    specs = next(iter(runners.values())).input_specs
    data = load_calibration(
        None, model_dir, [s.name for s in specs], batch=8, seq_len=seq, num_samples=8, num_heldout=64
    )
    batches = list(data.batches("heldout"))
    reference = runners["ORT fp32 model.onnx"]
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
    factory = variants(args.out_dir, args.threads, args.explore)[args.child]
    medians = {}
    for batch in args.batches:
        with factory(False, (batch, args.seq)) as runner:
            medians[batch] = time_interleaved(
                {args.child: runner}, args.out_dir, batch, args.seq, args.rounds
            )[args.child]
    print(json.dumps(medians))


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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    found = variants(args.out_dir, args.threads, args.explore)
    model_dir = args.model_dir or Path(json.loads((args.out_dir / "report.json").read_text())["model_dir"])
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
                accuracy = cosines(
                    {n: r for n, r in runners.items() if "static" not in n}, model_dir, args.seq
                )
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
    base = "ORT INT8 model.int8.cpu.onnx (before)"
    cols, header = [], []
    for batch in args.batches:
        for mode, table in tables.items():
            cols.append((batch, table))
            header.append(f"{batch}×{args.seq} {mode} ms (× vs before)")
    print(
        f"\n{args.threads} threads; interleaved and bursts: {args.rounds} rounds, medians; isolated: "
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
