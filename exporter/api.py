"""The Python API: `export_engine(model_dir, output_dir, config)`. The CLI only calls this.

Stages, in order (each timed in the report):
  load -> reference (LoRA merged by PEFT, masks applied) -> restructure (fold + slice, checked in
  PyTorch) -> export (ONNX, checked on ONNX Runtime) -> graph passes -> INT8 -> engine -> CPU engine
  candidates (where TensorRT does not serve) -> stage table (the candidates timed in it) -> CPU engine choice.
Every check compares with the masked+merged PyTorch reference and raises on failure: an export that
"succeeds" with wrong outputs is the failure this tool exists to prevent. What a check compares, which
metric judges it and how validation feeds are built is the task's to say (`exporter.tasks`): the API
asks the task, it does not branch on the model kind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import torch

from engines import bench_inputs, cpu_selection
from engines.base import Runner
from engines.onnxruntime_runner import shared_sessions
from engines.selection import BackendChoice, select_backend
from export_errors import InputError, ValidationError
from exporter import cpu_engine_stage, progress
from exporter.config import ExportConfig, check_ranges
from exporter.cpu_engine_stage import CpuEngineStage
from exporter.engine_stage import prebuild_problems, run_engine_stage
from exporter.export.decoder_with_past import export_decoder
from exporter.export.deploy_files import write_deployment_files
from exporter.export.external_data import BackgroundSave
from exporter.export.in_memory import start_export
from exporter.export.streaming.choose import (
    WHOLE_FILE_CHECK_BYTES,
    fp32_weight_bytes,
    small_for_auto,
    use_streaming,
)
from exporter.export.streaming.stream import StreamResult, stream_decoder_export
from exporter.export.task_heads import wrapper_for
from exporter.export.torch_to_onnx import EXPORTER, EXPORTER_REASON, export_arguments, input_names_for
from exporter.logfile import export_log
from exporter.model_dir.loader import ModelDir, build_reference_model, load_model_dir
from exporter.model_dir.tokenizer import load_tokenizer
from exporter.outputs import check_output_dir, staged_output
from exporter.quantize import int4_pair
from exporter.quantize import per_piece as streamed_quantized
from exporter.quantize.cpu_int8 import BackgroundBuild
from exporter.quantize.int4_stage import CPU_FILE as INT4_CPU_FILE
from exporter.quantize.int4_stage import Int4Config, load_decoder_calibration, run_int4_stage
from exporter.quantize.int8 import CPU_FILE as INT8_CPU_FILE
from exporter.quantize.int8_stage import (
    CLEANED_FILE,
    run_int8_stage,
    start_cpu_first_build,
    start_openvino_file,
)
from exporter.quantize.openvino_int8 import NncfJob
from exporter.report import files as report_io
from exporter.report import memory, process, stage_report, stage_table
from exporter.restructure.compact import save_compact
from exporter.restructure.families import family_for
from exporter.restructure.flops import FORMULA as FLOPS_FORMULA
from exporter.restructure.remove_dead import restructure
from exporter.runtime import decoder_pair
from exporter.runtime.generation import CachedDecoder
from exporter.tasks.spec import Task
from exporter.validate import sessions as check_sessions
from exporter.validate.compare import Comparison, check, compare_all
from exporter.validate.eval_set import EvalSet, load_eval_set
from exporter.validate.task_inputs import special_token_ids, task_validation_feeds
from exporter.validate.tolerances import tolerance
from graph_passes.pipeline import PipelineReport, optimize, optimize_file

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
_NOT_LOADED = (
    "per piece only: each streamed piece's ONNX vs its PyTorch piece on real hidden states "
    "(streaming.checks_max_abs); the whole files are larger than WHOLE_FILE_CHECK_BYTES and are not loaded"
)


@dataclasses.dataclass
class ExportResult:
    output_dir: Path
    onnx_path: Path
    report: dict[str, Any]
    artifacts: dict[str, Path]


def export_engine(
    model_dir: str | Path, output_dir: str | Path, config: ExportConfig | None = None
) -> ExportResult:
    """Export MODEL_DIR into OUT_DIR; returns the artifact paths and the report (also written)."""
    config = config or ExportConfig()
    check_ranges(config)  # the CLI checks them at parse time; API callers get the same one-line error
    out = Path(output_dir)
    check_output_dir(out, config.force)
    choice = select_backend(config.backend)  # --backend tensorrt where it cannot run: refused before any work
    _check_cpu_engine_flag(config, choice)  # so is a --cpu-engine that cannot run here
    run = _Run(Path(model_dir), config, choice)
    with process.gc_for_export(), staged_output(out) as work, export_log(work):
        logger.info("export %s -> %s (%s)", model_dir, out, _config_json(config))
        run.execute(work)
    artifacts = {name: out / path.name for name, path in run.artifacts.items()}
    return ExportResult(out, artifacts["onnx"], run.report, artifacts)


class _Run:
    """One export: holds the report as it grows and the artifacts written so far."""

    def __init__(self, model_dir: Path, config: ExportConfig, choice: BackendChoice) -> None:
        self.model_dir = model_dir
        self.config = config
        self.choice = choice
        self.report: dict[str, Any] = {
            "model_dir": str(model_dir),
            "config": _config_json(config),
            "backend": choice.to_json(),
            "timings_s": {},
        }
        self.artifacts: dict[str, Path] = {}
        self.eval_set: EvalSet | None = None
        self.special_ids: tuple[int | None, int | None] = (None, None)
        self.feeds: dict[str, np.ndarray] = {}
        # False for a streamed model over choose.WHOLE_FILE_CHECK_BYTES: the files are checked piece by piece
        self.whole_file_checks = True
        self.stream_result: StreamResult | None = None
        # a task model's held-out agreement gate (set by the INT8 stage), for the CPU engine candidates too
        self.task_agreement: cpu_engine_stage.TaskAgreement | None = None
        # the graph passes' cleaned (unfused) graph, its cleanup report and its file being written, for the
        # INT8 stage (taken once)
        self.cleaned: tuple[onnx.ModelProto, PipelineReport, BackgroundSave] | None = None
        # a KV-cache decoder's CPU INT8 file, first build, started when model.onnx is written (`_tail` closes it)
        self.cpu_first_build: BackgroundBuild | None = None
        # the CPU engine stage planned (and its candidates opened) ahead, by the INT8 stage
        self.cpu_plan: CpuEngineStage | None = None
        # the engine stage's pre-build checks of the Q/DQ file, run ahead on the background thread (INT8 stage)
        self.prebuild: tuple[Path, Future[list[Any]]] | None = None
        # model.exported.onnx's bytes, from the export stage to the graph passes (taken once); None when
        # it has external data or was streamed
        self.exported_bytes: bytes | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into the report, say it on the console (exporter/progress.py), record its peak RSS."""
        process.collect_between_stages()
        memory.reset_peak()
        with progress.stage(name, self.report["timings_s"]):
            yield
        self.report.setdefault("peak_rss_gib", {})[name] = memory.peak_gib()

    def execute(self, work: Path) -> None:
        torch.manual_seed(self.config.seed)
        try:
            streamed = self._streamed_front(work)
            if streamed is not None:  # glibc's malloc defaults: a streamed export's peak RSS is its bound
                md, feeds, reference = streamed
                self._tail(md, feeds, reference, None, work)
                return
            with (
                process.malloc_for_export()
            ):  # freed blocks reused, not page-faulted in anew (report/process.py)
                md, feeds, reference, uncompacted = self._whole_front(work)
                self._tail(md, feeds, reference, uncompacted, work)
        finally:
            if self.cleaned is not None:  # the export stopped before the INT8 stage took the cleaned file
                self.cleaned[2].discard()

    def _whole_front(
        self, work: Path
    ) -> tuple[ModelDir, dict[str, np.ndarray], Outputs, torch.nn.Module | None]:
        """load -> reference -> restructure -> export with the whole model in memory."""
        with self.stage("load"):
            md = load_model_dir(
                self.model_dir,
                adapter=self.config.adapter,
                allow_pickle=self.config.allow_pickle,
                task=self.config.task,
            )
            family_for(md.model_type, str(self.model_dir / "config.json"))
            self.task: Task = md.task
            self._check_precision(md)
            self.report["model"] = _model_json(md)
            self.special_ids = special_token_ids(md.config, md.tokenizer_path)
        with self.stage("reference"):
            model = build_reference_model(md)
            md.weights.clear()  # the model holds the weights now: keeping the loaded copy doubles the peak
            merge = md.lora_merge
            self.report["model"]["lora_merged_modules"] = len(merge.merged_modules) if merge else 0
            self.report["model"]["lora_max_abs_delta"] = merge.max_abs_delta if merge else 0.0
            wrapper = wrapper_for(md.task, model, _uses_token_types(md), md.pooling)
            self.feeds = feeds = self._feeds(md, wrapper)
            reference = _torch_outputs(wrapper, feeds)
            self._load_eval_set(md, wrapper)
            self._evaluate("reference", functools.partial(_torch_outputs, wrapper))
        # the PyTorch stage of the stage table is the uncompacted reference: keep a copy to time it
        uncompacted = copy.deepcopy(wrapper) if self._stage_table_wanted() else None
        with self.stage("restructure"):
            plan = restructure(model, md.pruned_heads)
            self._check("compact_pytorch", reference, _torch_outputs(wrapper, feeds))
            plan.save(work / "restructure_plan.json")
            save_compact(model, plan, work / "compact_model")
            self._carry_generation_config(md, work)
            self.report["restructure"] = _restructure_json(plan)
        with self.stage("export"), check_sessions.shared():  # the decoder's validation session, reused
            self._export(md, wrapper, model, feeds, reference, work)
            self.report["deployment"] = write_deployment_files(work, md, plan)
        del model, wrapper  # later stages use ONNX only: free the weights
        return md, feeds, reference, uncompacted

    def _streamed_front(self, work: Path) -> tuple[ModelDir, dict[str, np.ndarray], Outputs] | None:
        """load -> streamed reference + restructure + export, one decoder layer at a time
        (exporter/export/streaming); None when the whole-model path applies (`--streaming`)."""
        if self.config.streaming == "off" or not _is_safetensors_dir(self.model_dir):
            if self.config.streaming == "on":
                raise InputError(self.model_dir, "--streaming on reads safetensors weights (none found)")
            return None
        if small_for_auto(self.config.streaming, self.model_dir):
            return None  # the whole-model path loads the folder itself: not loaded twice
        start = time.perf_counter()
        memory.reset_peak()
        md = load_model_dir(
            self.model_dir,
            adapter=self.config.adapter,
            allow_pickle=self.config.allow_pickle,
            task=self.config.task,
            lazy=True,
        )
        if not use_streaming(self.config.streaming, md.task.with_past, self.model_dir, md.task.name):
            return None
        family_for(md.model_type, str(self.model_dir / "config.json"))
        self.task = md.task
        self._check_precision(md)
        if self.config.eval_data is not None:
            raise InputError("--eval-data", "not taken by the streaming export yet; pass --streaming off")
        self.report["model"] = _model_json(md)
        self.special_ids = special_token_ids(md.config, md.tokenizer_path)
        self.report["timings_s"]["load"] = round(time.perf_counter() - start, 3)
        self.report.setdefault("peak_rss_gib", {})["load"] = memory.peak_gib()
        self.whole_file_checks = fp32_weight_bytes(self.model_dir) <= WHOLE_FILE_CHECK_BYTES
        if self._quantize_per_piece() and self.choice.name == "tensorrt":
            raise InputError(
                "--backend",
                "tensorrt: a streamed model over WHOLE_FILE_CHECK_BYTES gets the CPU INT8/INT4 files only "
                "(the TensorRT Q/DQ and INT4 files need whole-graph calibration); use --precision fp32 "
                "or --backend onnxruntime",
            )
        if self._quantize_per_piece():  # flags the per-piece files cannot honour: refused, never dropped
            if self.config.precision == "int4" and self.config.int4_method == "awq":
                raise InputError(
                    "--int4-method",
                    "awq: a streamed model over WHOLE_FILE_CHECK_BYTES is quantized per piece by "
                    "round-to-nearest (AWQ scales need whole-model runs); use --int4-method rtn",
                )
            if self.config.precision == "int8" and self.config.cpu_int8_weights != "auto":
                raise InputError(
                    "--cpu-int8-weights",
                    f"{self.config.cpu_int8_weights}: a streamed model over WHOLE_FILE_CHECK_BYTES gets "
                    "8-bit weight-only blocks (MatMulNBits), not quantize_dynamic's weights; leave it auto",
                )
        with self.stage("stream_export"):
            self.feeds = feeds = self._feeds(md, None)
            path = work / "model.exported.onnx"
            result = stream_decoder_export(md, path, feeds, opset=self.config.opset)
            self.stream_result = result
            reference = {"logits": result.reference_logits}
            merge = result.lora_merge
            self.report["model"]["lora_merged_modules"] = len(merge.merged_modules) if merge else 0
            self.report["model"]["lora_max_abs_delta"] = merge.max_abs_delta if merge else 0.0
            plan = result.plan
            plan.save(work / "restructure_plan.json")
            self.report["restructure"] = _restructure_json(plan)
            self.report["streaming"] = {
                "layers": len(plan.layers),
                "checks_max_abs": result.checks,
                "seconds": result.seconds,
                "layer_traces": result.layer_traces,
                "compact_model": "not written by the streaming export (restructure_plan.json says the shapes)",
            }
            (work / "decoder_manifest.json").write_text(
                json.dumps(result.manifest.to_dict(), indent=2, sort_keys=True)
            )
            if self.whole_file_checks:
                outputs = self._onnx_outputs(path, feeds)
                self._check("onnx_fp32", reference, outputs, self.task.fp32_masks(feeds))
            else:
                self.report["streaming"]["not_checked_whole"] = ["onnx_fp32"]
                self.report["streaming"]["whole_file_checks"] = _NOT_LOADED
            self.artifacts["exported"] = path
            self.report["export"] = {**self._export_section(md), "streaming": True}
            self._carry_generation_config(md, work)
            self.report["deployment"] = write_deployment_files(work, md, plan)
        return md, feeds, reference

    def _tail(
        self,
        md: ModelDir,
        feeds: dict[str, np.ndarray],
        reference: Outputs,
        uncompacted: torch.nn.Module | None,
        work: Path,
    ) -> None:
        """graph passes -> INT8 / INT4 -> engine -> CPU engine candidates -> stage table -> report."""
        if self._quantize_per_piece():
            self._streamed_quantized(md, feeds, reference, work)
            report_io.write(work, self.report)
            return
        # a background thread opens the files for the checks (and the CPU engine's candidates) as soon as
        # they exist (exporter/validate/sessions.py `background`); it has ended before anything is timed
        with contextlib.ExitStack() as stack:
            # a file checked as deployed and opened as a CPU engine candidate: one ONNX Runtime session
            stack.enter_context(shared_sessions())
            with check_sessions.background(), check_sessions.as_deployed(self.config.benchmark_threads):
                self._passes_and_quantize(md, feeds, reference, work, stack)
                with self.stage("engine"):
                    self.report["engine"] = self._engine(md)
                cpu = self._cpu_candidates(md, feeds, reference, stack)
            rows = None
            if uncompacted is not None:
                with self.stage("stage_table"):
                    rows = self._stage_table_rows(uncompacted, feeds, reference, cpu)
            chosen = self._choose_cpu_engine(md, cpu, rows, feeds, stack) if cpu is not None else None
        if rows is not None:
            self._render_stage_table(rows, chosen, feeds, work)
        report_io.write(work, self.report)

    def _passes_and_quantize(
        self,
        md: ModelDir,
        feeds: dict[str, np.ndarray],
        reference: Outputs,
        work: Path,
        stack: contextlib.ExitStack,
    ) -> None:
        """graph passes -> INT8 / INT4. What they start beside themselves (the OpenVINO INT8 file's process,
        the early CPU INT8 build and its folder) ends here, also when they fail: no process is left writing
        OUT_DIR. `stack` holds the CPU engine candidates the INT8 stage opens early."""
        openvino_job = self._start_openvino_int8(md, feeds, work)  # runs beside the next two stages
        scratch = contextlib.ExitStack()  # folders that outlive a stage (the early CPU INT8 build)
        try:
            with (
                self.stage("graph_passes"),
                check_sessions.shared(),
            ):  # model.onnx's check session, built once
                self._optimize(md, feeds, reference, work, scratch)
            if self.config.precision == "int8":
                with self.stage("int8"):
                    self._int8(md, feeds, reference, work, openvino_job, stack)
        finally:
            if openvino_job is not None:
                openvino_job.cancel()  # a no-op once collected
            if self.cpu_first_build is not None:
                self.cpu_first_build.close()  # a no-op once taken and finished
            scratch.close()
        if self.config.precision == "int4":
            with self.stage("int4"):
                self._int4(md, feeds, reference, work)

    def _engine(self, md: ModelDir) -> dict[str, Any]:
        """The engine stage on the last precision's file, with TensorRT's pre-build checks the INT8 stage ran
        ahead on the background thread where they were run on that file."""
        engine_onnx = self.artifacts.get("int8", self.artifacts.get("int4", self.artifacts["onnx"]))
        ahead = self.prebuild
        problems = ahead[1].result() if ahead is not None and ahead[0] == engine_onnx else None
        return run_engine_stage(self.choice, engine_onnx, self._seq_limit(md), problems)

    def _quantize_per_piece(self) -> bool:
        """A streamed model too large to load whole, asked for INT8/INT4: quantized piece by piece."""
        return (
            self.config.streaming != "off"
            and not self.whole_file_checks
            and self.config.precision in ("int8", "int4")
            and self.task.with_past
        )

    def _streamed_quantized(
        self, md: ModelDir, feeds: dict[str, np.ndarray], reference: Outputs, work: Path
    ) -> None:
        """The CPU INT8/INT4 file quantized one piece at a time from the streamed fp32 graph (never loaded
        whole: exporter/quantize/per_piece.py), checked end to end (prefill + cached decode steps)
        against the streamed PyTorch reference, then the fp32 intermediate removed (disk)."""
        precision = self.config.precision
        exported = self.artifacts["exported"]
        with self.stage(precision):
            if precision == "int8":
                section = streamed_quantized.nbits_cpu_file(
                    exported,
                    work / INT8_CPU_FILE,
                    md.model_type,
                    streamed_quantized.INT8_BLOCK_SIZE,
                    4,
                    streamed_quantized.INT8_PIECE_BITS,
                )
                section["scheme"] = streamed_quantized.INT8_SCHEME
                section["weight_bits_reason"] = (
                    "8-bit MatMulNBits blocks (--cpu-int8-weights other than auto is refused here)"
                )
            else:
                layers = len(self.stream_result.plan.layers) if self.stream_result is not None else 0
                bits = streamed_quantized.int4_piece_bits(layers, self.config.int4_lm_head)
                section = streamed_quantized.nbits_cpu_file(
                    exported,
                    work / INT4_CPU_FILE,
                    md.model_type,
                    self.config.int4_block_size or 32,  # per piece: the block it was measured at
                    4,
                    bits,
                )
                section["method_reason"] = (
                    "round-to-nearest per piece: AWQ scales and the 4/8-bit search need whole-model runs"
                )
                section["bits_reason"] = streamed_quantized.int4_bits_reason(bits, layers)
            path = work / section["file"]
            self.report[precision] = {
                "cpu": section,
                "streamed_per_piece": True,
                "not_written": _NOT_WRITTEN_PER_PIECE,
            }
            self.artifacts[f"{precision}_cpu"] = path
            self.artifacts["onnx"] = path
        _release_freed_memory()  # the quantized weights were freed: give their heap back before the check
        try:
            with self.stage("validate_end_to_end"):
                self._end_to_end(path, precision, feeds, reference)
        finally:
            self.report.setdefault("extra_sections_md", []).append(
                streamed_quantized.markdown(precision, section, self.report.get("validation_end_to_end"))
            )
        self.report["engine"] = {"skipped": "streamed per-piece quantization writes the CPU file only"}
        removed = [exported.name, exported.name + ".data"]
        for name in removed:
            (work / name).unlink(missing_ok=True)
        self.artifacts.pop("exported")
        self.report["streaming"]["removed_after_validation"] = removed

    def _end_to_end(
        self, path: Path, precision: str, feeds: dict[str, np.ndarray], reference: Outputs
    ) -> None:
        """The final file on ONNX Runtime (as deployed: default session options): a prefill of the
        validation feeds and the cached decode steps the stream ran, vs the streamed PyTorch reference's
        logits: logit cosine and greedy (argmax) agreement on real tokens, gated by the precision's tolerance."""
        import onnxruntime as ort

        # ONNX Runtime's default options, as deployed: MatMulNBits prepacks its weights and the mapped file's
        # pages are released. Measured on the 1B shape's INT4 file (1.09 GiB): peak 1.47 GiB and 4 s with
        # prepacking, 2.15 GiB and 64 s without (each run then dequantizes every weight to an fp32 scratch
        # buffer, 2 GiB for the 8B LM head, and the whole file stays mapped).
        options = ort.SessionOptions()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        decoder = CachedDecoder(session)
        decoder.reset(feeds["input_ids"].shape[0], feeds["attention_mask"])
        prefill = decoder.forward(feeds["input_ids"])
        assert self.stream_result is not None
        steps = [decoder.forward(ids) for ids in self.stream_result.decode_ids]
        del session, decoder
        real = self.task.token_masks(feeds)
        self._check(f"{precision}_cpu", reference, {"logits": prefill}, real, None)
        mask = real["logits"].astype(bool)
        ref = [reference["logits"][mask], *(x[:, -1] for x in self.stream_result.decode_logits)]
        got = [prefill[mask], *(x[:, -1] for x in steps)]
        cos = [_row_cosines(r, g) for r, g in zip(ref, got)]
        agree = [np.argmax(r, -1) == np.argmax(g, -1) for r, g in zip(ref, got)]
        section = {
            "vs": "streamed PyTorch reference (masked + merged), teacher-forced on its tokens",
            "prefill_tokens": int(mask.sum()),
            "decode_steps": len(steps),
            "prefill_mean_cosine": float(cos[0].mean()),
            "prefill_greedy_agreement": float(agree[0].mean()),
            "decode_mean_cosine": [float(c.mean()) for c in cos[1:]],
            "decode_greedy_agreement": [float(a.mean()) for a in agree[1:]],
            "mean_cosine": float(np.concatenate(cos).mean()),
            "greedy_agreement": float(np.concatenate(agree).mean()),
        }
        bar = tolerance(precision)
        section["gate"] = {
            "min_mean_cosine": bar.min_mean_cosine,
            "min_greedy_agreement": bar.min_greedy_agreement,
        }
        self.report["validation_end_to_end"] = section
        misses = []
        if bar.min_mean_cosine is not None and section["mean_cosine"] < bar.min_mean_cosine:
            misses.append(f"mean logit cosine {section['mean_cosine']:.5f} < {bar.min_mean_cosine}")
        if bar.min_greedy_agreement is not None and section["greedy_agreement"] < bar.min_greedy_agreement:
            misses.append(f"greedy agreement {section['greedy_agreement']:.3f} < {bar.min_greedy_agreement}")
        section["gate"]["passed"] = not misses
        if misses:
            raise ValidationError(
                f"{path.name} end to end (prefill + {len(steps)} cached decode steps) vs the streamed "
                f"PyTorch reference: {'; '.join(misses)} ({precision} tolerance)"
            )

    def _export(
        self,
        md: ModelDir,
        wrapper: torch.nn.Module,
        model: torch.nn.Module,
        feeds: dict[str, np.ndarray],
        reference: Outputs,
        work: Path,
    ) -> None:
        """The compact model to ONNX, checked on ONNX Runtime against the reference."""
        path = work / "model.exported.onnx"
        if self.task.with_past:
            manifest, self.exported_bytes = export_decoder(model, path, opset=self.config.opset)
            (work / "decoder_manifest.json").write_text(
                json.dumps(manifest.to_dict(), indent=2, sort_keys=True)
            )
            outputs = self._onnx_outputs(path, feeds)  # on the decoder's validation session (sessions.adopt)
        else:
            example = {k: torch.from_numpy(v) for k, v in feeds.items()}
            axes = self.task.dynamic_axes(input_names_for(wrapper))
            args, input_names, output_names, axes = export_arguments(wrapper, example, axes)
            exported = start_export(wrapper, args, path, input_names, output_names, axes, self.config.opset)
            # the check session is built while the file is written (exporter/export/in_memory.py)
            with exported.checked() as session:
                outputs = self._session_outputs(session, feeds)
            self.exported_bytes = exported.data
        self._check("onnx_fp32", reference, outputs, self.task.fp32_masks(feeds))
        self.artifacts["exported"] = path
        self._evaluate("onnx_fp32", lambda batch: self._onnx_outputs(path, batch))
        self.report["export"] = self._export_section(md)

    def _optimize(
        self,
        md: ModelDir,
        feeds: dict[str, np.ndarray],
        reference: Outputs,
        work: Path,
        scratch: contextlib.ExitStack | None = None,
    ) -> None:
        """The backend's pass pipeline on the exported graph -> model.onnx, checked like the export.
        With `--sparsity enforce` the weights change on purpose: the error is reported, not gated.
        A KV-cache decoder's INT8 CPU file starts its first build from model.onnx here, once it is written
        (`scratch` holds its folder)."""
        target: Literal["tensorrt", "onnxruntime"] = (
            "tensorrt" if self.choice.name == "tensorrt" else "onnxruntime"
        )
        saving: BackgroundSave | None = None
        session = None
        if self.report["export"].get("streaming"):  # weights stay on disk (onnx-ir lazy external data)
            path = work / "model.onnx"
            pipeline = optimize_file(
                self.artifacts["exported"],
                path,
                target,
                family=md.model_type,
                strict_fusion=self.config.strict_fusion,
                sparsity=self.config.sparsity,
            )
        else:
            optimized, pipeline = optimize(
                self._exported_model(),
                target,
                family=md.model_type,
                strict_fusion=self.config.strict_fusion,
                sparsity=self.config.sparsity,
                on_cleaned=self._keep_cleaned if self.config.precision == "int8" else None,
            )
            # Serialized here, written to disk by a thread (~0.6 s for the 45M Llama's 221 MB) while the check
            # below runs on a session ONNX Runtime builds from the same bytes (outside the GIL).
            saving = BackgroundSave(optimized, work / "model.onnx")
            del optimized  # the bytes (or, over the one-file limit, the saving thread) hold it now
            session = check_sessions.session_from_bytes(saving.data) if saving.data is not None else None
            path = saving.path
        try:
            self.report["graph_passes"] = pipeline.to_json()
            self.artifacts["onnx"] = path
            if not self.whole_file_checks:
                self.report["streaming"]["not_checked_whole"].append("optimized_fp32")
                return
            if session is None:
                path = saving.wait() if saving is not None else path
                outputs = self._onnx_outputs(path, feeds)
            else:
                outputs = self._session_outputs(session, feeds)
            gate = "fp32" if self.config.sparsity != "enforce" else None
            self._check("optimized_fp32", reference, outputs, self.task.fp32_masks(feeds), gate)
        except BaseException:
            if saving is not None:
                saving.join()  # no thread left writing into OUT_DIR; the check's error is the one raised
            raise
        if saving is not None:
            path = saving.wait()  # raises where the write failed
        self.artifacts["onnx"] = path
        if scratch is not None and self.config.precision == "int8" and self.task.with_past:
            fused = self._onnxruntime_fused()
            if fused is not None:
                folder = Path(scratch.enter_context(tempfile.TemporaryDirectory()))
                self.cpu_first_build = start_cpu_first_build(fused, self.config, md.model_type, folder)
        self._evaluate("optimized_fp32", lambda batch: self._onnx_outputs(path, batch))

    def _exported_model(self) -> onnx.ModelProto:
        """model.exported.onnx parsed from the bytes the export stage made it from (taken once, released
        here), else read from the file (a model with external data)."""
        data, self.exported_bytes = self.exported_bytes, None
        return onnx.load_from_string(data) if data is not None else onnx.load(str(self.artifacts["exported"]))

    def _keep_cleaned(self, model: ir.Model, report: PipelineReport) -> None:
        """The cleanup stage's graph (before fusion), which the INT8 stage calibrates: kept, not recomputed.
        Its file (the INT8 stage reads it from disk) is written by a thread while the fusion passes run:
        single-threaded Python, beside which the kernel's ~0.6 s of writing 221 MB (the 45M Llama) costs
        nothing; at the INT8 stage's start (before) it was on the critical path."""
        proto = ir.serde.serialize_model(model)
        self.cleaned = (proto, report, BackgroundSave.temporary(proto, CLEANED_FILE))

    def _stage_table_wanted(self) -> bool:
        return self.config.benchmark and not self.task.with_past

    def _stage_table_rows(
        self,
        uncompacted: torch.nn.Module,
        feeds: dict[str, np.ndarray],
        reference: dict[str, np.ndarray],
        cpu: CpuEngineStage | None,
    ) -> list[stage_report.StageResult]:
        return stage_table.measure(
            uncompacted,
            list(reference),
            self.artifacts,
            feeds,
            self.report["validation"],
            self.config.benchmark_threads,
            self.config.benchmark_iterations,
            extra=cpu_engine_stage.extra_rows(cpu) if cpu is not None else None,
            agreement=self.report.get("task_agreement", {}),
            labeled=self.report.get("eval", {}).get("stages", {}),
        )

    def _render_stage_table(
        self,
        rows: list[stage_report.StageResult],
        chosen: cpu_selection.Choice | None,
        feeds: dict[str, np.ndarray],
        work: Path,
    ) -> None:
        if chosen is not None:  # the CPU engine's row says so
            row_name = cpu_engine_stage.candidate_row(chosen.name)
            rows = [
                dataclasses.replace(r, note=f"{r.note}; **the CPU engine** (chosen: {chosen.name})")
                if r.name == row_name
                else r
                for r in rows
            ]
        self.report["stages"] = stage_report.to_json(rows)
        self.report["stages"]["timing"] = (
            f"batch 1 x {feeds['input_ids'].shape[1]}, {self.config.benchmark_threads} threads, interleaved, "
            f"{stage_table.rounds_rule(self.config.benchmark_iterations)}; accuracy on all validation samples "
            "vs the PyTorch reference"
            + ("; labeled accuracy on --eval-data" if self.eval_set is not None else "")
        )
        self.report["stages_md"] = stage_report.render_markdown(rows)
        stage_report.write_chart(rows, work / "stages.png")

    def _cpu_candidates(
        self,
        md: ModelDir,
        feeds: dict[str, np.ndarray],
        reference: dict[str, np.ndarray],
        stack: contextlib.ExitStack,
    ) -> CpuEngineStage | None:
        """Where the CPU serves: the applicable candidates, opened and judged (their accuracy checks)."""
        if self.choice.name == "tensorrt":
            return None
        if not self.whole_file_checks:
            self.report["cpu_engine"] = {
                "skipped": "streamed model over WHOLE_FILE_CHECK_BYTES: not loaded whole"
            }
            return None
        with self.stage("cpu_engine"):
            cpu = self.cpu_plan or self._plan_cpu_engine()
            decoder = self.task.with_past
            real = self.task.token_masks(feeds)

            def outputs(runner: Runner) -> dict[str, np.ndarray]:
                return _decoder_prefill_with(runner, feeds) if decoder else runner.infer(feeds)

            cpu_engine_stage.open_and_judge(
                cpu,
                stack,
                self.config.benchmark_threads,
                reference,
                outputs,
                real,
                self.report["validation"],
                self._cpu_accuracy_target(),
                self.task_agreement,
                defer=self._decoder_timed() and cpu.pinned is None,
            )
        return cpu

    def _decoder_timed(self) -> bool:
        """A KV-cache decoder's CPU engine candidates are timed by `time_decoder_candidates` (no stage table)."""
        return self.config.benchmark and self.task.with_past and not self._stage_table_wanted()

    def _plan_cpu_engine(self) -> CpuEngineStage:
        return cpu_engine_stage.plan(
            self.artifacts, self.config.backend, self.config.cpu_engine, precision=self.config.precision
        )

    def _open_cpu_candidates_early(self, stack: contextlib.ExitStack, checked: set[str]) -> None:
        """Plan the CPU engine stage from the INT8 files (the artifacts it plans from are all written) and start
        opening its candidates on the background thread, beside the INT8 checks (`cpu_engine_stage.open_early`);
        `checked`: the validation keys the export's checks will hold by then."""
        if self.choice.name == "tensorrt" or not self.whole_file_checks:
            return
        try:
            self.cpu_plan = self._plan_cpu_engine()
        except InputError:  # raised where the stage plans it, as before
            return
        timed = self._decoder_timed()
        checked = checked | set(self.report.get("validation", {}))
        cpu_engine_stage.open_early(self.cpu_plan, stack, self.config.benchmark_threads, checked, timed)

    def _cpu_accuracy_target(self) -> float:
        """The quantized CPU candidates' mean-cosine gate: --accuracy-target (INT8); an INT4 export's file is
        judged at its own target (--int4-accuracy-target, else the int4 tolerance), as its stage gated it."""
        if self.config.precision == "int4":
            return self.config.int4_accuracy_target or tolerance("int4").min_mean_cosine or 0.95
        return self.config.accuracy_target

    def _choose_cpu_engine(
        self,
        md: ModelDir,
        cpu: CpuEngineStage,
        rows: list[stage_report.StageResult] | None,
        feeds: dict[str, np.ndarray],
        stack: contextlib.ExitStack,
    ) -> cpu_selection.Choice:
        threads = self.config.benchmark_threads
        latencies: dict[str, float] | None = None
        if rows is not None:
            by_row = {r.name: r.latency_median_ms for r in rows}
            latencies = {
                a.candidate.name: by_row[cpu_engine_stage.candidate_row(a.candidate.name)]
                for a in cpu.applicable
                if cpu_engine_stage.candidate_row(a.candidate.name) in by_row
            }
            timing = "latency: the stage table's interleaved rounds (batch 1 x the validation length)"
        elif self.config.benchmark and self.task.with_past:
            with self.stage("cpu_engine_timing"):
                latencies = cpu_engine_stage.time_decoder_candidates(
                    cpu,
                    stack,
                    threads,
                    lambda runner: _decoder_timing_feeds(runner, feeds, md.config.vocab_size),
                )
                cpu_engine_stage.judge_deferred(cpu, latencies)  # those still in the running: judged now
            timing = (
                f"latency: prefill of {feeds['input_ids'].shape[1]} tokens + "
                f"{cpu_engine_stage.DECODE_STEPS_RANKED} x one decode step after it, batch 1, interleaved"
            )
        else:
            timing = "not timed (--no-benchmark): the default order decides among candidates that pass"
        chosen = cpu_engine_stage.choose_engine(cpu, latencies)
        self.report["engine"]["cpu"] = cpu_engine_stage.report_section(cpu, chosen, threads, timing)
        logger.info("CPU engine: %s on %s (%s)", chosen.name, chosen.chosen.path.name, chosen.reason)
        return chosen

    def _openvino_int8_wanted(self) -> bool:
        return self.choice.name != "tensorrt" and self.config.backend != "onnxruntime"

    def _start_openvino_int8(self, md: ModelDir, feeds: dict[str, np.ndarray], work: Path) -> NncfJob | None:
        """An encoder's OpenVINO INT8 file (NNCF's recipe) started in a second process as soon as the
        exported graph exists: mostly one core of Python, beside the graph passes and the INT8 stage (README
        "Export speed"); collected at the INT8 stage's end, before anything is timed."""
        if self.config.precision != "int8" or self.task.with_past or not self._openvino_int8_wanted():
            return None
        return start_openvino_file(
            self.artifacts["exported"],
            work,
            self.config,
            tokenizer_path=md.tokenizer_path,
            input_names=list(feeds),
            sequence_length=self._seq_len(md),
            vocab_size=md.config.vocab_size,
            padding_side=self.task.padding_side,
        )

    def _int8(
        self,
        md: ModelDir,
        feeds: dict[str, np.ndarray],
        reference: Outputs,
        work: Path,
        openvino_job: NncfJob | None,
        stack: contextlib.ExitStack,
    ) -> None:
        """INT8 artifacts, gated on held-out accuracy vs fp32 and compared with the PyTorch reference.
        KV-cache decoders are calibrated on prefills and also get greedy agreement vs the fp32 model;
        classifiers, taggers and QA models are also gated on their held-out task agreement.
        The sessions of those checks are built on the background thread as soon as each file is final
        (`_prefetch_int8_checks`), and the CPU engine's candidates opened after them (`stack` holds them)."""
        result, section = run_int8_stage(
            self.artifacts["exported"],
            work,
            self.config,
            family=md.model_type,
            tokenizer_path=md.tokenizer_path,
            input_names=list(feeds),
            sequence_length=self._seq_len(md),
            vocab_size=md.config.vocab_size,
            decoder_with_past=self.task.with_past,
            padding_side=self.task.padding_side,
            openvino_file=self._openvino_int8_wanted(),
            openvino_job=openvino_job,
            fused=self._onnxruntime_fused(),
            fused_checked=self._fused_checked(),
            cleaned=self._take_cleaned(),
            cpu_first_build=self.cpu_first_build,
            on_file=self._prefetch_int8_checks,
        )
        self.report["int8"] = section
        self.artifacts["int8"] = result.tensorrt_path
        if result.openvino_path is not None:
            self.artifacts["int8_openvino"] = result.openvino_path
        if result.cpu_path is not None:
            self.artifacts["int8_cpu"] = result.cpu_path
        self._open_cpu_candidates_early(stack, {"int8_cpu"} if result.cpu_path is not None else set())
        real = self.task.token_masks(feeds)  # INT8 is judged on real tokens
        gate = "int8" if self.task.with_past else None  # others: gated on held-out cosine inside quantize
        # a decoder's Q/DQ file: checked on the held-out judge's session of the same graph (Q/DQ as written, the
        # weights' DequantizeLinear folded: the same bits as a new session of the file, no build)
        trt_session = result.tensorrt_session if self.task.with_past else None
        result.tensorrt_session = None
        trt_outputs = (
            _decoder_prefill_with(trt_session, feeds)
            if trt_session is not None
            else self._onnx_outputs(result.tensorrt_path, feeds)
        )
        self._check("int8_tensorrt", reference, trt_outputs, real, gate)
        self._evaluate("int8_tensorrt", lambda batch: self._onnx_outputs(result.tensorrt_path, batch))
        cpu_session = (
            None  # a decoder's CPU file: one session (as deployed) for its prefill and greedy checks
        )
        if result.cpu_path is not None:
            cpu_path = result.cpu_path
            if self.task.with_past:
                cpu_session = check_sessions.check_session(cpu_path, optimized=True)
                cpu_outputs = _decoder_prefill_with(cpu_session, feeds)
            else:
                cpu_outputs = self._onnx_outputs(cpu_path, feeds, optimized=True)
            self._check("int8_cpu", reference, cpu_outputs, real, gate)
            self._evaluate("int8_cpu", lambda batch: self._onnx_outputs(cpu_path, batch, optimized=True))
        if self.task.with_past:
            reference_session = check_sessions.check_session(
                self.artifacts["onnx"], optimized=True
            )  # one fp32 session for both files
            runs: dict[bytes, Any] = {}  # and its greedy runs, computed once
            for variant, path in (("tensorrt", result.tensorrt_path), ("cpu", result.cpu_path)):
                if path is not None:
                    session = cpu_session if variant == "cpu" else (trt_session or path)
                    section[variant].update(
                        _decoder_int8_quality(reference_session, session, feeds, runs=runs)
                    )
                    section[variant]["quality_run_as"] = (
                        "ONNX Runtime's defaults, as deployed"
                        if variant == "cpu" or trt_session is None
                        else "Q/DQ executed as written (fake quantization: TensorRT's INT8 arithmetic, in float)"
                    )
        if self.task.gate_on_agreement:
            self._agreement_gate(
                section, result.heldout, {"tensorrt": result.tensorrt_path, "cpu": result.cpu_path}
            )

    def _prefetch_int8_checks(self, path: Path, variant: str, judged: bool = False) -> None:
        """`run_int8_stage`'s `on_file`: the sessions `_int8`'s checks of this final file will build, with the
        options they use, built now on the background thread (`check_sessions.prefetch`); for the Q/DQ file
        also TensorRT's pre-build checks, which the engine stage takes (`_engine`). `judged`: the stage hands
        over its judge's session of the file (`QuantResult.tensorrt_session`), which a decoder's checks use."""
        decoder = self.task.with_past
        if variant == "cpu":
            check_sessions.prefetch(path, optimized=True)
            if decoder:  # the greedy agreement's fp32 reference
                check_sessions.prefetch(self.artifacts["onnx"], optimized=True)
        else:
            on_judges_session = decoder and judged  # a decoder's checks: the session handed over
            if not on_judges_session:
                check_sessions.prefetch(path)
                if decoder:  # the greedy agreement's run of the Q/DQ file
                    check_sessions.prefetch(path, optimized=True)
            self.prebuild = (path, check_sessions.submit(functools.partial(prebuild_problems, path)))

    def _take_cleaned(self) -> tuple[onnx.ModelProto, PipelineReport, BackgroundSave] | None:
        """The graph passes' cleaned graph, report and file being written, handed over once (None: the INT8
        stage cleans)."""
        cleaned, self.cleaned = self.cleaned, None
        return cleaned

    def _fused_checked(self) -> float | None:
        """model.onnx's max abs error vs the PyTorch reference where its check ran under the fp32 gate (None: not
        checked so): the INT8 stage's CPU file takes the fused graph on that check (QuantConfig.cpu_fused_checked)."""
        checked = self.report.get("validation", {}).get("optimized_fp32")
        if not checked or self.config.sparsity == "enforce":  # enforce: reported, not gated
            return None
        return max(float(c["max_abs"]) for c in checked)

    def _onnxruntime_fused(self) -> Path | None:
        """model.onnx where it is graph_passes' onnxruntime pipeline on the whole exported graph with weights
        unchanged (no --sparsity enforce): the INT8 stage's CPU file needs that same fused graph."""
        passes = self.report.get("graph_passes", {})
        if passes.get("target") != "onnxruntime" or self.config.sparsity == "enforce":
            return None
        return None if self.report["export"].get("streaming") else self.artifacts.get("onnx")

    def _check_precision(self, md: ModelDir) -> None:
        """INT4 is weight-only: it pays where weight bytes per token bound the time (decoding with a cache)."""
        if self.config.precision == "int4" and not self.task.with_past:
            kind = f"a {self.task.name} export without a KV cache"
            raise InputError(
                "--precision",
                f"int4 is weight-only, for causal LMs with a KV cache ({md.model_type} here is {kind}): "
                "a forward over whole sequences is bound by arithmetic, not by weight bytes, so INT4 weights "
                "would save size but no time and cost accuracy; use --precision int8",
            )

    def _int4(
        self, md: ModelDir, feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray], work: Path
    ) -> None:
        """INT4 weight-only files, gated on held-out logit cosine (in the stage) and here on greedy agreement
        with the fp32 model (teacher-forced), and compared with the PyTorch reference for the report."""
        config = self.config
        int4 = Int4Config(
            lm_head=config.int4_lm_head,
            max_positions=int(getattr(md.config, "max_position_embeddings", 4096) or 4096),
        )
        if config.int4_method:
            int4.method = config.int4_method
        if config.int4_block_size:
            int4.block_size = config.int4_block_size
        if config.int4_accuracy_target is not None:
            int4.min_cosine = config.int4_accuracy_target
        calibration = load_decoder_calibration(
            config,
            md.tokenizer_path,
            ["input_ids", "attention_mask"],
            self._seq_len(md),
            md.config.vocab_size,
        )
        reusable = (
            self.choice.name != "tensorrt" and self.config.sparsity != "enforce" and self.whole_file_checks
        )
        result = (
            run_int4_stage(  # model.onnx is the CPU file's fp32 graph where our onnxruntime pipeline wrote it
                self.artifacts["exported"],
                work,
                calibration,
                int4,
                family=md.model_type,
                optimized=self.artifacts["onnx"] if reusable else None,
            )
        )
        self.report["int4"] = section = result.report
        self.artifacts["int4"] = result.tensorrt_path
        self.artifacts["int4_cpu"] = result.cpu_path
        real = {"logits": feeds["attention_mask"].astype(bool)}
        self._check(
            "int4_tensorrt", reference, _decoder_prefill_outputs(result.tensorrt_path, feeds), real, None
        )
        cpu = _decoder_prefill_outputs(result.cpu_path, feeds, optimized=True)
        self._check("int4_cpu", reference, cpu, real, None)
        bar = tolerance("int4").min_greedy_agreement or 0.0
        reference_session = check_sessions.check_session(self.artifacts["onnx"], optimized=True)
        for variant, path in (("tensorrt", result.tensorrt_path), ("cpu", result.cpu_path)):
            section[variant].update(_decoder_int8_quality(reference_session, path, feeds))
            agreement = section[variant]["greedy_agreement"]
            if agreement < bar:
                raise ValidationError(
                    f"INT4 {variant} file {path.name}: greedy agreement with fp32 (teacher-forced) {agreement:.3f} < "
                    f"{bar} (int4 tolerance); free-running {section[variant]['free_running_agreement']:.3f}, "
                    f"logit cosine {section[variant]['logit_mean_cosine']:.5f}"
                )
        if self.choice.name != "tensorrt" and config.int4_prefill != "off" and self.whole_file_checks:
            self._int4_pair(feeds, reference, work, result.cpu_path, int4.min_cosine, bar)

    def _int4_pair(
        self,
        feeds: dict[str, np.ndarray],
        reference: Outputs,
        work: Path,
        decode: Path,
        min_cosine: float,
        min_agreement: float,
    ) -> None:
        """The prefill/decode pair (exporter/quantize/int4_pair.py): the INT8 prompt file, gated (its prefill
        logits vs the reference at the INT4 cosine target; the pair's generation vs fp32 at the INT4 greedy
        bar), kept where its prefill is measured faster (--no-benchmark: by the README's measurement) or asked
        (--int4-prefill int8, where a gate miss raises); recorded as deployment.decoder_pair."""
        forced = self.config.int4_prefill == "int8"
        path, weights = int4_pair.build_prefill_file(
            self.artifacts["onnx"], work, self.config.cpu_int8_weights
        )
        real = {"logits": feeds["attention_mask"].astype(bool)}
        outputs = _decoder_prefill_outputs(path, feeds, optimized=True)
        cosine = self._check("int4_prefill", reference, outputs, real, None)[0].mean_cosine
        rows = [ids[m.astype(bool)][:16] for ids, m in zip(feeds["input_ids"], feeds["attention_mask"])]
        pair_gate = decoder_pair.judge_pair(self.artifacts["onnx"], path, decode, rows[:2], min_agreement)
        problems = []
        if cosine < min_cosine:
            problems.append(f"{path.name} prefill logit cosine vs the reference {cosine:.5f} < {min_cosine}")
        if not pair_gate["passed"]:
            problems.append(
                f"the pair's greedy agreement with fp32 {pair_gate['greedy_agreement']:.3f} < {min_agreement}"
            )
        if problems and forced:
            raise ValidationError(f"INT4 prefill/decode pair (--int4-prefill int8): {'; '.join(problems)}")
        timing: dict[str, Any] = {"timed": False, "why": "--no-benchmark: kept by the README's measurement"}
        if self.config.benchmark and not problems:
            prompt = feeds["input_ids"][:1][:, feeds["attention_mask"][0].astype(bool)]
            timing = decoder_pair.time_prefills(path, decode, prompt, self.config.benchmark_threads)
            timing.update(timed=True, prompt_tokens=int(prompt.shape[1]))
            if not forced and timing["prefill_file_ms"] >= timing["decode_file_ms"]:
                problems.append(
                    f"{path.name} prefill {timing['prefill_file_ms']:.1f} ms is not faster than "
                    f"{decode.name}'s {timing['decode_file_ms']:.1f} ms"
                )
        kept = not problems
        self.report["int4"]["pair"] = {
            "prefill": path.name,
            "decode": decode.name,
            "kept": kept,
            "why_not": problems,
            "prefill_weights": weights,
            "prefill_gate": {
                "mean_cosine": cosine,
                "min_mean_cosine": min_cosine,
                "passed": cosine >= min_cosine,
            },
            "pair_gate": pair_gate,
            "timing": timing,
        }
        if not kept:
            path.unlink()
            return
        self.artifacts["int4_prefill"] = path
        self.report["deployment"]["decoder_pair"] = {
            "prefill": path.name,
            "decode": decode.name,
            "engine": "onnxruntime",
            "how": "the prompt (a call with an empty cache) on prefill, every later step on decode, one cache: "
            "exporter.runtime.generation.CachedDecoder(decode, prefill=...); used where the CPU engine serves decode",
        }

    def _agreement_gate(
        self, section: dict[str, Any], heldout: dict[str, np.ndarray], files: dict[str, Path | None]
    ) -> None:
        """Held-out task agreement of each INT8 file with the fp32 export (never used for ranges or layer
        choices), beside the cosine gate: a classifier is judged by the labels it picks."""
        heldout = self.task.prepare_feeds(heldout, *self.special_ids)
        fp32 = self._onnx_outputs(self.artifacts["exported"], heldout)
        target = self.config.agreement_target
        decoder = self.task.with_past

        def measure(runner: Runner) -> float:
            outputs = _decoder_prefill_with(runner, heldout) if decoder else runner.infer(heldout)
            return self.task.agreement(fp32, outputs, heldout, self.special_ids[1])["agreement"]

        self.task_agreement = cpu_engine_stage.TaskAgreement(measure, target)
        misses = []
        for variant, path in files.items():
            if path is None:
                continue
            outputs = self._onnx_outputs(path, heldout, optimized=variant == "cpu")
            agreement = self.task.agreement(fp32, outputs, heldout, self.special_ids[1])
            section[variant]["heldout_task_agreement"] = agreement
            if agreement["agreement"] < target:
                misses.append(f"{path.name}: {agreement['agreement']:.4f}")
        section["agreement_gate"] = {
            "target": target,
            "samples": int(heldout["input_ids"].shape[0]),
            "vs": "fp32 model.exported.onnx on the held-out calibration split",
            "passed": not misses,
        }
        if misses:
            raise ValidationError(
                f"INT8 task agreement gate failed: {self.task.name} agreement with fp32 on "
                f"{section['agreement_gate']['samples']} held-out samples below {target} "
                f"(--agreement-target): {', '.join(misses)}; the held-out samples are the calibration data's: "
                "calibrate on the task's own text (--calibration) to judge it on its own inputs"
            )

    def _export_section(self, md: ModelDir) -> dict[str, Any]:
        """report.json `export`: how the graph was made and what it computes."""
        return {
            "exporter": EXPORTER,
            "reason": EXPORTER_REASON,
            "opset": self.config.opset,
            "task": self.task.name,
            "task_source": md.task_source,
            "architecture": md.architecture,
            "outputs": list(self.task.outputs),
        }

    def _onnx_outputs(self, path: Path, feeds: dict[str, np.ndarray], optimized: bool = False) -> Outputs:
        if self.task.with_past:
            return _decoder_prefill_outputs(path, feeds, optimized)
        return _onnxruntime_outputs(path, feeds, optimized)

    def _session_outputs(self, session: Any, feeds: dict[str, np.ndarray]) -> Outputs:
        """`_onnx_outputs` on a session already built (`check_sessions.session_from_bytes`)."""
        if self.task.with_past:
            return _decoder_prefill_with(session, feeds)
        return _session_run(session, feeds)

    def _feeds(self, md: ModelDir, wrapper: torch.nn.Module | None) -> dict[str, np.ndarray]:
        side = self.task.padding_side
        if md.tokenizer_path is not None:
            _, padding = load_tokenizer(md.tokenizer_path, side)
            self.report["model"]["tokenizer_padding"] = padding.to_json()
        return task_validation_feeds(
            self.task,
            input_names_for(wrapper) if wrapper is not None else ["input_ids", "attention_mask"],
            md.tokenizer_path,
            md.config.vocab_size,
            self.config.validation_samples,
            self._seq_len(md),
            self.special_ids,
            padding_side=side,
        )

    def _carry_generation_config(self, md: ModelDir, work: Path) -> None:
        """MODEL_DIR/generation_config.json (eos ids, sampling defaults) into OUT_DIR and compact_model/."""
        if md.generation_config_path is None:
            return
        for folder in (work, work / "compact_model"):
            if not folder.is_dir():  # the streaming export writes no compact_model/
                continue
            shutil.copy2(md.generation_config_path, folder / md.generation_config_path.name)
        self.artifacts["generation_config"] = work / md.generation_config_path.name

    def _load_eval_set(self, md: ModelDir, wrapper: torch.nn.Module) -> None:
        if self.config.eval_data is None:
            return
        self.eval_set = load_eval_set(
            Path(self.config.eval_data),
            self.task,
            md.tokenizer_path,
            md.config,
            input_names_for(wrapper),
            self._seq_len(md),
        )
        self.report["eval"] = {
            "file": str(self.eval_set.path),
            "samples": self.eval_set.samples,
            "stages": {},
        }

    def _evaluate(self, check_name: str, run: Callable[[dict[str, np.ndarray]], Outputs]) -> None:
        """Labeled accuracy of one stage on --eval-data (nothing without it)."""
        if self.eval_set is None:
            return
        batches = [run(batch) for batch in self.eval_set.batches()]
        outputs = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
        scores = self.eval_set.score(outputs)
        self.report["eval"]["stages"][check_name] = scores
        logger.info("%s: labeled accuracy %.4f, f1 %.4f", check_name, scores["accuracy"], scores["f1"])

    def _seq_limit(self, md: ModelDir) -> int:
        return min(512, int(getattr(md.config, "max_position_embeddings", 512)))

    def _seq_len(self, md: ModelDir) -> int:
        return min(self.config.sequence_length, self._seq_limit(md))

    def _check(
        self,
        what: str,
        reference: Outputs,
        outputs: Outputs,
        token_masks: dict[str, np.ndarray] | None = None,
        gate: str | None = "fp32",
    ) -> list[Comparison]:
        """Compare with the reference, record it and the task's agreement, and raise when outside the
        `gate` dtype's tolerance."""
        comparisons = compare_all(reference, outputs, token_masks)
        self.report.setdefault("validation", {})[what] = [c.to_json() for c in comparisons]
        agreement = self.task.agreement(reference, outputs, self.feeds, self.special_ids[1])
        if agreement:
            self.report.setdefault("task_agreement", {})[what] = agreement
        if gate is not None:
            check(comparisons, gate, what)
        return comparisons


_NOT_WRITTEN_PER_PIECE = {
    "model.onnx": "the fp32 graph after the passes: the quantized file is made from the streamed export",
    "model.exported.onnx": "the fp32 export (the size of the model in fp32): removed once the quantized "
    "file passed its end-to-end check",
    "tensorrt_files": "the TensorRT Q/DQ (INT8) and DequantizeLinear (INT4) files need static ranges or "
    "a search over whole-model runs; not made per piece",
    "sensitivity_search": "the held-out search runs the whole model many times: the per-piece widths are a "
    "fixed rule measured on the 1B shape (int4: the early layers and the embedding 8-bit), and the "
    "end-to-end gate judges the file",
}


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps large freed arenas mapped: measured at 8B, ~7 GiB of
    freed quantized weights stayed resident into the next stage)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return np.sum(a64 * b64, axis=-1) / np.maximum(norms, 1e-30)


def _is_safetensors_dir(model_dir: Path) -> bool:
    from exporter.model_dir.files import SAFETENSORS_FILE, SAFETENSORS_INDEX

    return (model_dir / SAFETENSORS_FILE).exists() or (model_dir / SAFETENSORS_INDEX).exists()


def _uses_token_types(md: ModelDir) -> bool:
    return getattr(md.config, "type_vocab_size", 0) > 0


@torch.no_grad()
def _torch_outputs(wrapper: torch.nn.Module, feeds: dict[str, np.ndarray]) -> Outputs:
    from exporter.export.torch_to_onnx import output_names_for

    outputs = wrapper(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: o.numpy() for name, o in zip(output_names_for(wrapper), outputs)}


def _onnxruntime_outputs(path: Path, feeds: dict[str, np.ndarray], optimized: bool = False) -> Outputs:
    """Run with ONNX Runtime's own graph optimizations off, so they cannot hide a bug of ours;
    `optimized` runs as deployed (the CPU INT8 model is judged as ORT's integer kernels compute it)."""
    return _session_run(check_sessions.check_session(path, optimized), feeds)


def _session_run(session: Any, feeds: dict[str, np.ndarray]) -> Outputs:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _decoder_prefill_outputs(path: Path, feeds: dict[str, np.ndarray], optimized: bool = False) -> Outputs:
    """Logits of a prefill with an empty past, ONNX Runtime optimizations off unless `optimized`."""
    decoder = CachedDecoder(check_sessions.check_session(path, optimized))
    decoder.reset(feeds["input_ids"].shape[0], feeds["attention_mask"])
    return {"logits": decoder.forward(feeds["input_ids"])}


def _decoder_prefill_with(runner: Runner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Logits of a prefill with an empty past, on any runner (a CPU engine candidate)."""
    decoder = CachedDecoder(runner)
    decoder.reset(feeds["input_ids"].shape[0], feeds["attention_mask"])
    return {"logits": decoder.forward(feeds["input_ids"])}


def _decoder_timing_feeds(
    runner: Runner, feeds: dict[str, np.ndarray], vocab_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Batch 1: a prefill of the validation length, and one decode step after that many tokens."""
    specs = runner.input_specs
    seq = feeds["input_ids"].shape[1]
    past = next(s for s in specs if s.name.startswith("past_key_values."))
    prefill = bench_inputs.resolve_shapes(specs, {"input_ids": (1, seq)})
    decode_shape = (1, int(past.shape[1]), seq, int(past.shape[3]))
    decode = bench_inputs.resolve_shapes(specs, {"input_ids": (1, 1), past.name: decode_shape})
    return (
        bench_inputs.make_feeds(specs, prefill, vocab_size),
        bench_inputs.make_feeds(specs, decode, vocab_size),
    )


def _check_cpu_engine_flag(config: ExportConfig, choice: BackendChoice) -> None:
    """`--cpu-engine` names a candidate that can run here, on a CPU path, with this precision."""
    if config.cpu_engine is None:
        return
    if choice.name == "tensorrt":
        raise InputError(
            "--cpu-engine", f"{config.cpu_engine}: TensorRT serves here (--backend {config.backend})"
        )
    from engines.openvino_runner import openvino_unavailable_reason

    keys = {"exported", "onnx"} | (
        {"int8", "int8_cpu", "int8_openvino"} if config.precision == "int8" else set()
    )
    restrict = config.backend if config.backend in ("onnxruntime", "openvino") else "auto"
    cpu_selection.applicable(
        dict.fromkeys(keys, Path()),
        unavailable={"onnxruntime": None, "openvino": openvino_unavailable_reason()},
        flags=cpu_selection.cpu_flags(),
        backend=restrict,
        pinned=config.cpu_engine,
        precision=config.precision,
    )


def _decoder_int8_quality(
    reference: Any,
    int8: Path | Any,
    feeds: dict[str, np.ndarray],
    prompts: int = 2,
    new_tokens: int = 16,
    runs: dict[bytes, Any] | None = None,
) -> dict[str, Any]:
    """Greedy agreement and logit cosine of the INT8 decoder (a path: run with ONNX Runtime's defaults; or a
    session: the CPU file's as deployed, the Q/DQ file's held-out judge's, Q/DQ as written) vs the fp32
    optimized model (`reference`: its session) over a short generation from the first validation prompts (real
    tokens only, at most 16). `runs`: the reference's greedy runs, shared between the files judged against it
    (generation.greedy_agreement's `reference_runs`)."""
    from exporter.runtime.generation import greedy_agreement

    rows = [ids[mask.astype(bool)][:16] for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"])]
    candidate = check_sessions.check_session(int8, optimized=True) if isinstance(int8, Path) else int8
    quality = greedy_agreement(
        reference, candidate, rows[:prompts], max_new_tokens=new_tokens, reference_runs=runs
    )
    return {**quality, "quality_vs": "fp32 model.onnx (greedy agreement teacher-forced on its tokens)"}


def _config_json(config: ExportConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


def _model_json(md: ModelDir) -> dict[str, Any]:
    return {
        "model_type": md.model_type,
        "task": md.task.name,
        "task_source": md.task_source,
        "architecture": md.architecture,
        "mask_source": md.mask_source,
        "masked_parameters": len(md.masks),
        "adapter": str(md.adapter_path) if md.adapter_path else None,
        "adapter_head_tensors": sorted(md.adapter.head_tensors) if md.adapter else [],
        "ignored_tensors": md.ignored_tensors,
        "pruned_heads_in_checkpoint": {str(k): v for k, v in md.pruned_heads.items()},
        "tokenizer": md.tokenizer_path is not None,
        "pooling": dataclasses.asdict(md.pooling) if md.pooling else None,
    }


def _restructure_json(plan: Any) -> dict[str, Any]:
    return {
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        "params_removed": plan.params_before - plan.params_after,
        "removed_totals": plan.removed_totals(),
        "sublayers_removed": {str(layer): names for layer, names in plan.sublayers_removed().items()},
        "flops_per_token": plan.flops_per_token(),
        "flops_saved_by_sublayer_removal": plan.flops_saved_by_sublayer_removal(),
        "flops_formula": FLOPS_FORMULA,
        "layers": [
            {
                "layer": layer.layer,
                "heads": layer.shapes.heads,
                "kv_heads": layer.shapes.kv_heads,
                "ffn": layer.shapes.ffn,
                "removed": layer.removed,
                "sublayers_removed": layer.sublayers_removed,
                "notes": layer.notes,
                "params_before": layer.params_before,
                "params_after": layer.params_after,
            }
            for layer in plan.layers
        ],
    }
