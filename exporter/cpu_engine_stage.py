"""The CPU engine stage: every applicable candidate measured, the fastest passing one chosen.

Where TensorRT does not serve, the export measures the candidates of engines/cpu_selection.py:
- accuracy on the export's validation inputs against the PyTorch reference, each as *its* runtime
  computes it, judged by its precision's gate (INT8/INT4: mean token cosine >= `--accuracy-target` on
  real tokens, the INT8 gate; fp32: the fp32 tolerance; bf16: the bf16 row of the tolerance table).
  ONNX Runtime's candidates reuse the export's own checks of their files (`int8_cpu`, `optimized_fp32`),
  the others are run here and recorded beside them (`validation["cpu:<candidate>"]`);
- latency at the export's shapes: candidates that are already stages of the stage table take their
  row, the others join the stage table's one interleaved measurement as extra rows
  (exporter/report/stage_table.py). Without a stage table (`--no-benchmark`), nothing is timed and the
  default order decides; KV-cache decoders (no stage table) are timed here on a small budget: a
  prefill of the validation length and one decode step after it, ranked by prefill + 64 decode steps:
  3 rounds each, then only the fastest passing candidate (until it has 6) and those not told apart from
  it (~95% intervals of the medians), at most 10. A decoder's candidates that no export check covers are
  judged after that timing, from the fastest down until one passes (`judge_deferred`): a candidate slower
  than a passing one could not be chosen, so its accuracy is not measured (its row says so).

The choice goes to `report["engine"]["cpu"]` (engine, file, precision, the candidates table, why
each other lost): what `engine-bench OUT_DIR` and the runtime open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import CancelledError, Future, wait
from pathlib import Path
from typing import Any

import numpy as np

from engines import benchmark, load_runner, stats
from engines.base import Runner, open_together
from engines.benchmark import BenchConfig, Iteration, Variant
from engines.cpu_selection import (
    Applicable,
    Choice,
    Measurement,
    applicable,
    choose,
    cpu_flags,
    cpu_kind,
)
from engines.openvino_runner import openvino_unavailable_reason, shared_reads
from exporter.report.stage_report import StageInfo
from exporter.report.stage_table import ExtraStage
from exporter.validate import sessions
from exporter.validate.compare import Comparison, compare_all
from exporter.validate.tolerances import tolerance

logger = logging.getLogger(__name__)

# Candidates whose file the export already checks (and times, as a stage): (validation key, stage row).
EXPORT_CHECKS: dict[str, tuple[str, str]] = {
    "onnxruntime-int8": ("int8_cpu", "int8 CPU"),
    "onnxruntime-fp32": ("optimized_fp32", "onnx fp32 optimized"),
}
DECODE_STEPS_RANKED = 64  # decoders: rank by the time of a prefill + this many decode steps
# Decoders: every candidate timed FIRST_DECODER_ROUNDS rounds; then the fastest passing candidate until it has
# MIN_DECODER_ROUNDS (its latency is the one reported as the engine's), and every candidate whose score is
# not told apart from its score (their intervals overlap), up to 10 rounds. A candidate already told apart
# after the first rounds (their whole ranges apart: OpenVINO's files 2-3x slower than ONNX Runtime's INT8 on
# the 45M Llama) is not timed again: more rounds could not change the choice.
FIRST_DECODER_ROUNDS = 3
MIN_DECODER_ROUNDS = 6
DECODER_TIMING = BenchConfig(
    warmup_ms=50.0,
    iterations=FIRST_DECODER_ROUNDS,
    duration_s=0.0,
    avg_runs=1,
    percentiles=(90.0,),
    max_iterations=10,
)

# outputs (candidate name -> outputs on the validation feeds), for the caller's model kind
Outputs = Callable[[Runner], dict[str, np.ndarray]]


@dataclasses.dataclass
class CpuEngineStage:
    """What applies here, the open runners of the candidates measured here, and their accuracy."""

    applicable: list[Applicable]
    skipped: dict[str, str]
    flags: frozenset[str]
    pinned: str | None
    runners: dict[str, Runner] = dataclasses.field(default_factory=dict)
    accuracy: dict[str, tuple[list[Comparison], bool, str]] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    # runners opened ahead (`open_early`): name -> (runner, its index in the opening's per-runner errors)
    early: dict[str, tuple[Runner, int]] = dataclasses.field(default_factory=dict)
    early_opened: Future[list[Exception | None]] | None = None
    # opened but not yet judged (`open_and_judge(defer=True)`): judged by `judge_deferred` only where the
    # timing leaves them a chance to be chosen; `judge_one(name)` judges one as `open_and_judge` would
    unjudged: set[str] = dataclasses.field(default_factory=set)
    judge_one: Callable[[str], None] | None = None


def plan(
    artifacts: Mapping[str, Path],
    backend: str,
    pinned: str | None,
    flags: frozenset[str] | None = None,
    precision: str = "int8",
) -> CpuEngineStage:
    """The candidates to measure on this machine (backend, precision: the export's `--backend`, `--precision`)."""
    flags = cpu_flags() if flags is None else flags
    unavailable = {"onnxruntime": None, "openvino": openvino_unavailable_reason()}
    restrict = backend if backend in ("onnxruntime", "openvino") else "auto"
    found, skipped = applicable(
        artifacts, unavailable=unavailable, flags=flags, backend=restrict, pinned=pinned, precision=precision
    )
    return CpuEngineStage(found, skipped, flags, pinned)


def gate(precision: str, comparisons: list[Comparison], accuracy_target: float) -> tuple[bool, str]:
    """(passed, the gate in words) for a candidate of `precision`, every output judged."""
    if precision in ("int8", "int4"):
        return all(c.mean_cosine >= accuracy_target for c in comparisons), (
            f"mean token cosine >= {accuracy_target} ({precision}, --accuracy-target)"
        )
    tol = tolerance(precision)
    ok = all(
        (tol.max_abs is None or c.max_abs <= tol.max_abs)
        and (tol.min_mean_cosine is None or c.mean_cosine >= tol.min_mean_cosine)
        for c in comparisons
    )
    words = [f"max abs err <= {tol.max_abs:g}" if tol.max_abs is not None else ""]
    words.append(f"mean cosine >= {tol.min_mean_cosine}" if tol.min_mean_cosine is not None else "")
    return ok, f"{', '.join(w for w in words if w)} ({precision} tolerance)"


@dataclasses.dataclass(frozen=True)
class TaskAgreement:
    """A task model's held-out agreement gate for the candidates judged here (the INT8 files' gate,
    `--agreement-target`, as *their* runtime computes them): `measure(runner)` is the agreement of the
    runner's task outputs with fp32 on the held-out samples (the caller's task code)."""

    measure: Callable[[Runner], float]
    target: float


def agreement_gate(
    passed: bool, words: str, agreement: float | None, target: float | None
) -> tuple[bool, str]:
    """The cosine gate joined by the task-agreement gate (when measured): both must pass."""
    if agreement is None or target is None:
        return passed, words
    return passed and agreement >= target, (
        f"{words}; held-out task agreement {agreement:.4f} >= {target} (--agreement-target)"
    )


def open_early(
    stage: CpuEngineStage,
    stack: contextlib.ExitStack,
    threads: int,
    checked: Collection[str],
    timed: bool,
) -> None:
    """Start opening the candidates' runners now, on the export's background thread
    (exporter/validate/sessions.py `submit`), two at a time as `open_and_judge` would, while the export's
    INT8 checks run on the main thread: the candidates `open_and_judge` will run (those whose file no export
    check in `checked`, the validation keys, covers) and, where the decoder timing opens every candidate
    (`timed`), the others too. The same runners with the same options, opened earlier: `open_and_judge` and
    `time_decoder_candidates` take them (an opening's error counts where it would have been raised). Their
    exits go on `stack`."""
    wanted = [
        app
        for app in stage.applicable
        if timed
        or app.candidate.name not in EXPORT_CHECKS
        or EXPORT_CHECKS[app.candidate.name][0] not in checked
    ]
    runners: dict[str, Runner] = {}
    for app in wanted:
        try:
            runners[app.candidate.name] = load_runner(
                app.path, threads=threads, spinning=False, **_options(app)
            )
        except Exception:  # left to the stage's own opening, which records it
            continue
    opened = contextlib.ExitStack()

    def work() -> list[Exception | None]:
        with shared_reads():
            return open_together(list(runners.values()), opened)

    stage.early = {name: (runner, index) for index, (name, runner) in enumerate(runners.items())}
    stage.early_opened = sessions.submit(work)
    stack.callback(_close_early, stage.early_opened, opened)


def _close_early(opening: Future[list[Exception | None]], opened: contextlib.ExitStack) -> None:
    with contextlib.suppress(CancelledError):
        opening.exception()  # the opening has ended (it never started when cancelled)
    opened.close()


def _take_early(stage: CpuEngineStage, name: str) -> tuple[Runner, Exception | None] | None:
    """The runner `open_early` opened for candidate `name` and its opening's error, once (None: not opened ahead)."""
    entry = stage.early.pop(name, None)
    if entry is None or stage.early_opened is None:
        return None
    runner, index = entry
    return runner, stage.early_opened.result()[index]


def open_and_judge(
    stage: CpuEngineStage,
    stack: contextlib.ExitStack,
    threads: int,
    reference: Mapping[str, np.ndarray],
    outputs: Outputs,
    token_masks: Mapping[str, np.ndarray] | None,
    validation: dict[str, list[dict[str, Any]]],
    accuracy_target: float,
    task_agreement: TaskAgreement | None = None,
    defer: bool = False,
) -> None:
    """Open (in `stack`) and judge every candidate the export has not already checked; reuse the export's
    checks for the others. Results go into `stage.accuracy`, and `validation["cpu:<name>"]`.
    `task_agreement` (task models): the INT8/INT4 candidates judged here must also pass it (the export's
    own INT8 files already passed it in the INT8 stage). `defer` (the decoder's candidates, timed next): open
    them, judge none yet; `judge_deferred` judges after the timing those that could still be chosen."""
    to_open: list[tuple[Applicable, Runner]] = []
    ready: list[tuple[Applicable, Runner, Exception | None]] = []  # opened, with the opening's error
    order = [app.candidate.name for app in stage.applicable]
    failed: dict[str, Exception] = {}
    for app in stage.applicable:
        name, cand = app.candidate.name, app.candidate
        if name in EXPORT_CHECKS and EXPORT_CHECKS[name][0] in validation:
            comparisons = [Comparison(**c) for c in validation[EXPORT_CHECKS[name][0]]]
            stage.accuracy[name] = (comparisons, *gate(cand.precision, comparisons, accuracy_target))
            continue
        early = _take_early(stage, name)
        if early is not None:
            ready.append((app, *early))
            continue
        try:
            to_open.append((app, load_runner(app.path, threads=threads, spinning=False, **_options(app))))
        except Exception as exc:
            failed[name] = exc
    # compiled two at a time (engines.base.open_together), a file read once by OpenVINO, then judged one by one
    with shared_reads():
        opened = open_together([runner for _, runner in to_open], stack)
    ready += [(app, runner, error) for (app, runner), error in zip(to_open, opened)]
    ready.sort(key=lambda item: order.index(item[0].candidate.name))
    if defer:
        judge = functools.partial(
            _judge_one, stage, reference, outputs, token_masks, validation, accuracy_target, task_agreement
        )
        for app, runner, error in ready:
            if error is not None:
                failed[app.candidate.name] = error
                continue
            stage.runners[app.candidate.name] = runner
            stage.unjudged.add(app.candidate.name)
        stage.judge_one = judge
        _record_errors(stage, failed)
        return
    # each candidate's outputs computed while the previous one's are compared (one core of numpy) on the
    # background thread (exporter/validate/sessions.py `submit`; at once outside its block): at most two
    # candidates' outputs held at once; the results are recorded in the candidates' order below
    compared: dict[str, Future[list[Comparison]] | Exception] = {}
    previous: Future[list[Comparison]] | None = None
    for app, runner, error in ready:
        try:
            if error is not None:
                raise error
            result = outputs(runner)
        except Exception as exc:  # a runtime that cannot load or run a file loses, with the reason
            compared[app.candidate.name] = exc
            continue
        if previous is not None:
            wait([previous])
        previous = sessions.submit(functools.partial(compare_all, reference, result, token_masks))
        compared[app.candidate.name] = previous
        del result
    for app, runner, _ in ready:
        name = app.candidate.name
        try:
            entry = compared[name]
            if isinstance(entry, Exception):
                raise entry
            comparisons = entry.result()
        except Exception as exc:  # a runtime that cannot load or run a file loses, with the reason
            failed[name] = exc
            continue
        stage.runners[name] = runner
        _record_verdict(stage, app, runner, comparisons, validation, accuracy_target, task_agreement)
    _record_errors(stage, failed)


def _record_verdict(
    stage: CpuEngineStage,
    app: Applicable,
    runner: Runner,
    comparisons: list[Comparison],
    validation: dict[str, list[dict[str, Any]]],
    accuracy_target: float,
    task_agreement: TaskAgreement | None,
) -> None:
    """A judged candidate's comparisons into `validation`, and its gate (and task agreement) into `stage`."""
    name, cand = app.candidate.name, app.candidate
    validation[f"cpu:{name}"] = [c.to_json() for c in comparisons]
    passed, words = gate(cand.precision, comparisons, accuracy_target)
    if task_agreement is not None and cand.precision in ("int8", "int4"):
        passed, words = agreement_gate(passed, words, task_agreement.measure(runner), task_agreement.target)
    stage.accuracy[name] = (comparisons, passed, words)


def _record_errors(stage: CpuEngineStage, failed: Mapping[str, Exception]) -> None:
    for name, exc in failed.items():
        stage.errors[name] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("CPU engine candidate %s could not run: %s", name, stage.errors[name])


def _judge_one(
    stage: CpuEngineStage,
    reference: Mapping[str, np.ndarray],
    outputs: Outputs,
    token_masks: Mapping[str, np.ndarray] | None,
    validation: dict[str, list[dict[str, Any]]],
    accuracy_target: float,
    task_agreement: TaskAgreement | None,
    name: str,
) -> None:
    """Judge one opened candidate as `open_and_judge` does (its outputs vs the reference, its gate, the task
    agreement); a candidate that cannot run loses with the reason."""
    app = next(app for app in stage.applicable if app.candidate.name == name)
    runner = stage.runners[name]
    stage.unjudged.discard(name)
    try:
        comparisons = compare_all(reference, outputs(runner), token_masks)
    except Exception as exc:  # a runtime that cannot run a file loses, with the reason
        del stage.runners[name]
        _record_errors(stage, {name: exc})
        return
    _record_verdict(stage, app, runner, comparisons, validation, accuracy_target, task_agreement)


def judge_deferred(stage: CpuEngineStage, latencies: Mapping[str, float]) -> None:
    """After the timing, judge the deferred candidates that could still be chosen: from the fastest, each
    unjudged one until the first that passes its gate (judged before, or here). A slower candidate cannot be
    chosen whatever its accuracy, so it is left unjudged (the report says so). The 45M Llama: its three
    OpenVINO candidates, 2.4-2.8x slower than ONNX Runtime's INT8 file (which the export already checked),
    are no longer run on the validation prefill (~1 s). The timing treated the unjudged ones as passing: where
    the fastest then fails its gate, the choice among the rest reads the rounds already run (their medians),
    whose stopping rule was set against it."""
    if stage.judge_one is None:
        return
    ranked = sorted(latencies, key=lambda n: latencies[n])
    for name in ranked + sorted(stage.unjudged - set(ranked)):
        if name in stage.unjudged:
            stage.judge_one(name)
        if name in stage.accuracy and stage.accuracy[name][1]:
            return


def extra_rows(stage: CpuEngineStage) -> list[ExtraStage]:
    """The candidates measured here, as rows for the stage table's interleaved timing."""
    by_name = {app.candidate.name: app for app in stage.applicable}
    return [
        ExtraStage(
            name,
            runner,
            StageInfo(path=by_name[name].path, note=f"CPU engine candidate: {by_name[name].candidate.note}"),
            f"cpu:{name}",
        )
        for name, runner in stage.runners.items()
    ]


def candidate_row(name: str) -> str:
    """The stage-table row that holds a candidate's latency."""
    return EXPORT_CHECKS[name][1] if name in EXPORT_CHECKS else name


def time_decoder_candidates(
    stage: CpuEngineStage,
    stack: contextlib.ExitStack,
    threads: int,
    prefill: Callable[[Runner], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
) -> dict[str, float]:
    """KV-cache decoders: each candidate's prefill feeds and one decode step after it (`prefill(runner)`
    gives both), timed interleaved (`DECODER_TIMING`, stopping rule `unresolved`); the score is prefill +
    64 decode steps, in ms. The candidates not opened by the judging are opened two at a time."""
    runners = dict(stage.runners)
    wanted = [
        app
        for app in stage.applicable
        if app.candidate.name not in runners and app.candidate.name not in stage.errors
    ]
    early = {app.candidate.name: _take_early(stage, app.candidate.name) for app in wanted}
    to_open = {
        app.candidate.name: load_runner(app.path, threads=threads, spinning=False, **_options(app))
        for app in wanted
        if early[app.candidate.name] is None
    }
    errors = [entry[1] for entry in early.values() if entry is not None]
    errors += open_together(list(to_open.values()), stack)
    error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    opened = {name: entry[0] for name, entry in early.items() if entry is not None} | to_open
    runners |= {app.candidate.name: opened[app.candidate.name] for app in wanted}
    variants = []
    for name, runner in list(runners.items()):
        prefill_feeds, decode_feeds = prefill(runner)
        if name in stage.unjudged and not _runs(stage, name, runner, prefill_feeds):
            del runners[name]
            continue
        variants += [
            Variant(f"{name}:prefill", runner, prefill_feeds),
            Variant(f"{name}:decode", runner, decode_feeds),
        ]
    names = list(runners)
    # not judged yet: timed as if passing (each may be the one chosen, until `judge_deferred` says otherwise)
    passing = {name for name in names if stage.accuracy.get(name, ([], False, ""))[1]} | stage.unjudged

    def more(runs: Sequence[list[Iteration]]) -> set[int]:
        scores = {name: score_interval(runs[2 * i], runs[2 * i + 1]) for i, name in enumerate(names)}
        rounds = {name: len(runs[2 * i]) for i, name in enumerate(names)}
        return {2 * names.index(n) + k for n in still_timed(scores, passing, rounds) for k in (0, 1)}

    results = {
        r.name: stats.median(sorted(it.latency_ms for it in r.iterations))
        for r in benchmark.run_interleaved(variants, DECODER_TIMING, more=more)
    }
    return {
        name: results[f"{name}:prefill"] + DECODE_STEPS_RANKED * results[f"{name}:decode"] for name in runners
    }


def _runs(stage: CpuEngineStage, name: str, runner: Runner, feeds: dict[str, np.ndarray]) -> bool:
    """Whether a candidate not judged yet runs (one call): one that cannot loses with the reason, as its
    judging would have recorded it, instead of failing the timing."""
    try:
        runner.infer(feeds)
    except Exception as exc:
        stage.unjudged.discard(name)
        stage.runners.pop(name, None)
        _record_errors(stage, {name: exc})
        return False
    return True


def score_interval(prefill: Sequence[Iteration], decode: Sequence[Iteration]) -> tuple[float, float, float]:
    """A decoder candidate's score (prefill + 64 decode steps, ms) as (median, low, high): the medians, and
    the ends of their distribution-free ~95% intervals (engines/stats.py median_ci) combined the same way."""
    p = sorted(it.latency_ms for it in prefill)
    d = sorted(it.latency_ms for it in decode)
    (p_low, p_high), (d_low, d_high) = stats.median_ci(p), stats.median_ci(d)
    return (
        stats.median(p) + DECODE_STEPS_RANKED * stats.median(d),
        p_low + DECODE_STEPS_RANKED * d_low,
        p_high + DECODE_STEPS_RANKED * d_high,
    )


def unresolved(scores: Mapping[str, tuple[float, float, float]], passing: set[str]) -> set[str]:
    """The candidates still to time: the fastest (lowest median score) of those that pass their gate and every
    passing one whose interval overlaps its interval; none once the fastest is told apart from all the others
    (then more rounds would not change the choice, at ~95% confidence). Candidates that fail their gate cannot
    be chosen: timed the minimum only (all of them are ranked when none passes)."""
    pool, leader = _contest(scores, passing)
    rivals = {name for name in pool if name != leader and scores[name][1] <= scores[leader][2]}
    return {leader, *rivals} if rivals else set()


def still_timed(
    scores: Mapping[str, tuple[float, float, float]], passing: set[str], rounds: Mapping[str, int]
) -> set[str]:
    """The candidates to time another round: the `unresolved` ones, and the leader (the fastest passing one)
    until it has `MIN_DECODER_ROUNDS` rounds."""
    _, leader = _contest(scores, passing)
    needed = unresolved(scores, passing)
    return needed | {leader} if rounds[leader] < MIN_DECODER_ROUNDS else needed


def _contest(scores: Mapping[str, tuple[float, float, float]], passing: set[str]) -> tuple[list[str], str]:
    """(the candidates in the contest: those passing their gate, or all when none does; the leader: the
    lowest median score among them)."""
    pool = [name for name in scores if name in passing] or list(scores)
    return pool, min(pool, key=lambda name: scores[name][0])


def choose_engine(stage: CpuEngineStage, latencies: Mapping[str, float] | None) -> Choice:
    """The choice over every applicable candidate, from its accuracy and (if timed) latency."""
    measured = []
    for app in stage.applicable:
        name = app.candidate.name
        if name in stage.errors:
            measured.append(
                Measurement(app.candidate, app.path, None, None, None, False, "", stage.errors[name])
            )
            continue
        latency = None if latencies is None else latencies.get(name)
        if name in stage.unjudged:  # timed, slower than a candidate that passes: it could not be chosen
            measured.append(
                Measurement(app.candidate, app.path, latency, None, None, False, "", judged=False)
            )
            continue
        comparisons, passed, words = stage.accuracy[name]
        measured.append(
            Measurement(
                app.candidate,
                app.path,
                latency,
                min(c.mean_cosine for c in comparisons),
                max(c.max_abs for c in comparisons),
                passed,
                words,
            )
        )
    return choose(measured, stage.pinned)


def report_section(stage: CpuEngineStage, choice: Choice, threads: int, timing: str) -> dict[str, Any]:
    """report["engine"]["cpu"]: the one place that says which CPU engine serves this export."""
    chosen = choice.chosen
    return {
        "candidate": choice.name,
        "engine": chosen.candidate.engine,
        "file": chosen.path.name,
        "precision": chosen.candidate.precision,
        "engine_precision": chosen.candidate.engine_precision,
        "threads": threads,
        "reason": choice.reason,
        "cpu": cpu_kind(stage.flags),
        "timing": timing,
        "candidates": choice.rows(),
        "skipped": stage.skipped,
    }


def _options(app: Applicable) -> dict[str, Any]:
    return app.candidate.runner_options()
