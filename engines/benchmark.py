"""The timing loop, with trtexec's semantics, over any `Runner`, alone or interleaved with others.

trtexec's inference options, as its help text defines them:
- `--warmUp=N`: run for N milliseconds to warm up before measuring performance (time, not a count);
- `--iterations=N`: run *at least* N inference iterations;
- `--duration=N`: run performance measurements for *at least* N seconds of wallclock time;
- `--avgRuns=N`: report averages over N consecutive iterations (the "Trace details" section).
The timed phase ends when both the iteration count and the duration are reached.

Interleaving: on a shared, noisy 2-core machine a slow minute hits whichever variant happens to run
then. Running several variants round-robin in one process (one query of each in turn) spreads that
noise over all of them, so their ratios hold even when single figures drift. Each variant stops
once *its own* accumulated time reaches the duration and it has the iteration count; its walltime is
the sum of its own query spans (for a single variant, first start to last end, as trtexec).

Host timing only: `time.perf_counter_ns` around a synchronous `infer`. A GPU runner that can time
H2D / compute / D2H with CUDA events exposes `infer_with_device_times` (see `DeviceTimedRunner`);
the loop then records those, and latency becomes H2D + compute + D2H as in trtexec. We never derive
GPU times from host clocks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from engines import stats
from engines.base import Runner

Feeds = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """trtexec's defaults: 200 ms warm-up, at least 10 iterations and 3 s, averages of 10, p90/95/99."""

    warmup_ms: float = 200.0
    iterations: int = 10
    duration_s: float = 3.0
    avg_runs: int = 10
    percentiles: tuple[float, ...] = (90.0, 95.0, 99.0)
    # Stopping rule on confidence (0: off, trtexec's fixed budget): past `iterations` and `duration_s`, a
    # variant keeps running, up to `max_iterations`, until its median's ~95% interval is within ±this fraction.
    median_rel_ci: float = 0.0
    max_iterations: int = 0

    def __post_init__(self) -> None:
        if self.warmup_ms < 0:
            raise ValueError(f"warm-up must be >= 0 ms, got {self.warmup_ms}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.duration_s < 0:
            raise ValueError(f"duration must be >= 0 s, got {self.duration_s}")
        if self.avg_runs < 1:
            raise ValueError(f"avgRuns must be >= 1, got {self.avg_runs}")
        bad = [p for p in self.percentiles if not 0.0 <= p <= 100.0]
        if bad:
            raise ValueError(f"percentiles must be in [0, 100], got {bad}")


@dataclasses.dataclass(frozen=True)
class DeviceTimes:
    """Per-query device timings (ms) from CUDA events, supplied by a GPU runner's hook."""

    h2d_ms: float
    compute_ms: float
    d2h_ms: float
    enqueue_ms: float | None = None


@runtime_checkable
class DeviceTimedRunner(Protocol):
    """Optional hook a GPU runner implements; CPU runners do not, and their summaries omit GPU lines."""

    def infer_with_device_times(self, feeds: Feeds) -> tuple[dict[str, np.ndarray], DeviceTimes]: ...


@dataclasses.dataclass(frozen=True)
class Iteration:
    """One timed query: host start/end in ms from the start of the timed phase, and device times if any."""

    start_ms: float
    end_ms: float
    device: DeviceTimes | None = None

    @property
    def host_ms(self) -> float:
        return self.end_ms - self.start_ms

    @property
    def latency_ms(self) -> float:
        """trtexec's Latency: H2D + GPU compute + D2H on GPU; the host span of the call otherwise."""
        if self.device is None:
            return self.host_ms
        return self.device.h2d_ms + self.device.compute_ms + self.device.d2h_ms

    def to_dict(self) -> dict[str, float]:
        record = {"startMs": self.start_ms, "endMs": self.end_ms, "latencyMs": self.latency_ms}
        if self.device is not None:
            record |= {"h2dMs": self.device.h2d_ms, "computeMs": self.device.compute_ms}
            record |= {"d2hMs": self.device.d2h_ms}
            if self.device.enqueue_ms is not None:
                record["enqueueMs"] = self.device.enqueue_ms
        return record


@dataclasses.dataclass
class BenchResult:
    """Everything measured for one variant; statistics are derived on demand."""

    name: str
    backend: str
    config: BenchConfig
    warmup_queries: int
    warmup_ms: float
    iterations: list[Iteration]
    walltime_ms: float
    interleaved_with: int = 1
    input_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def has_device_times(self) -> bool:
        return bool(self.iterations) and all(it.device is not None for it in self.iterations)

    @property
    def throughput_qps(self) -> float:
        return stats.throughput_qps(len(self.iterations), self.walltime_ms)

    def latency(self) -> stats.Summary:
        return stats.summarize([it.latency_ms for it in self.iterations], self.config.percentiles)

    def device_summary(self, field: str) -> stats.Summary | None:
        """Summary of one DeviceTimes field ("h2d_ms", "compute_ms", "d2h_ms", "enqueue_ms") or None."""
        if not self.has_device_times:
            return None
        values = [getattr(it.device, field) for it in self.iterations]
        if any(v is None for v in values):
            return None
        return stats.summarize(values, self.config.percentiles)

    def total_gpu_compute_ms(self) -> float | None:
        """Sum of GPU compute times (trtexec's Total GPU Compute Time), None without device times."""
        compute = self.device_summary("compute_ms")
        return None if compute is None else compute.mean * len(self.iterations)

    def averages(self) -> list[float]:
        """Mean latency of each complete group of `avg_runs` consecutive queries (trtexec's trace details)."""
        n = self.config.avg_runs
        lat = [it.latency_ms for it in self.iterations]
        return [stats.mean(lat[i : i + n]) for i in range(0, len(lat) - n + 1, n)]

    def to_dict(self) -> dict[str, object]:
        summary: dict[str, object] = {
            "name": self.name,
            "backend": self.backend,
            "warmupQueries": self.warmup_queries,
            "warmupMs": self.warmup_ms,
            "queries": len(self.iterations),
            "interleavedWith": self.interleaved_with,
            "inputShapes": {name: list(shape) for name, shape in self.input_shapes.items()},
            "throughputQps": self.throughput_qps,
            "totalHostWalltimeS": self.walltime_ms / 1000.0,
            "latencyMs": self.latency().to_dict(),
            "averagesMs": self.averages(),
            "config": dataclasses.asdict(self.config),
        }
        for field, key in (("h2d_ms", "h2dMs"), ("compute_ms", "gpuComputeMs"), ("d2h_ms", "d2hMs")):
            device = self.device_summary(field)
            if device is not None:
                summary[key] = device.to_dict()
        total_gpu_ms = self.total_gpu_compute_ms()
        if total_gpu_ms is not None:
            summary["totalGpuComputeS"] = total_gpu_ms / 1000.0
        return summary


@dataclasses.dataclass(frozen=True)
class Variant:
    """One thing to time: a display name, an active runner and the feeds it is timed on."""

    name: str
    runner: Runner
    feeds: Feeds


Progress = Callable[[float], None]
# The caller's stopping rule beyond `iterations`: given every variant's queries so far, the indices of the
# variants it still needs timed (each up to `max_iterations`); see `run_interleaved`.
More = Callable[[Sequence[list[Iteration]]], set[int]]


def _now_ms() -> float:
    return time.perf_counter_ns() / 1e6


def _one_query(runner: Runner, feeds: Feeds, origin_ms: float) -> Iteration:
    if isinstance(runner, DeviceTimedRunner):
        start = _now_ms()
        _, device = runner.infer_with_device_times(feeds)
        return Iteration(start - origin_ms, _now_ms() - origin_ms, device)
    start = _now_ms()
    runner.infer(feeds)
    return Iteration(start - origin_ms, _now_ms() - origin_ms)


def _warm_up(variants: Sequence[Variant], warmup_ms: float) -> list[tuple[int, float]]:
    """Round-robin until every variant has spent `warmup_ms` of its own time (at least one query each)."""
    spent = [0.0] * len(variants)
    count = [0] * len(variants)
    while True:
        pending = [i for i, s in enumerate(spent) if s < warmup_ms or count[i] == 0]
        if not pending:
            return list(zip(count, spent))
        for i in pending:
            it = _one_query(variants[i].runner, variants[i].feeds, 0.0)
            spent[i] += it.host_ms
            count[i] += 1


def _timed(
    variants: Sequence[Variant], config: BenchConfig, progress: Progress | None, more: More | None = None
) -> list[list[Iteration]]:
    """Round-robin until every variant has `iterations` queries and `duration_s` of time: wallclock
    time for a single variant (as trtexec), each variant's own accumulated query time when interleaved;
    then, with `more`, the variants it names, one round at a time, each up to `max_iterations`."""
    target_ms = config.duration_s * 1000.0
    runs: list[list[Iteration]] = [[] for _ in variants]
    spent = [0.0] * len(variants)
    origin = _now_ms()
    next_report = origin
    while True:
        if len(variants) == 1:
            spent[0] = _now_ms() - origin
        pending = [
            i
            for i in range(len(variants))
            if len(runs[i]) < config.iterations or spent[i] < target_ms or not _confident(runs[i], config)
        ]
        if not pending and more is not None:
            pending = sorted(i for i in more(runs) if len(runs[i]) < config.max_iterations)
        if not pending:
            return runs
        for i in pending:
            it = _one_query(variants[i].runner, variants[i].feeds, origin)
            runs[i].append(it)
            spent[i] += it.host_ms
        if progress is not None and _now_ms() >= next_report:  # at most 10 reports a second
            progress(min(_fraction(len(r), s, config) for r, s in zip(runs, spent)))
            next_report = _now_ms() + 100.0


def _confident(runs: list[Iteration], config: BenchConfig) -> bool:
    """The stopping rule: off, or the median known within ±`median_rel_ci`, or `max_iterations` spent."""
    if config.median_rel_ci <= 0.0 or len(runs) >= config.max_iterations:
        return True
    return stats.median_ci_relative([it.host_ms for it in runs]) <= config.median_rel_ci


def _fraction(count: int, spent_ms: float, config: BenchConfig) -> float:
    target_ms = config.duration_s * 1000.0
    return min(count / config.iterations, spent_ms / target_ms if target_ms else 1.0)


def run_interleaved(
    variants: Sequence[Variant],
    config: BenchConfig | None = None,
    progress: Progress | None = None,
    more: More | None = None,
) -> list[BenchResult]:
    """Time `variants` (runners already active) round-robin in this process; one result per variant.
    `more`: a caller's stopping rule, asked after each round once every variant has met `config`'s own
    (e.g. exporter/cpu_engine_stage.py: until the fastest candidate is told apart from the rest)."""
    if not variants:
        raise ValueError("nothing to benchmark")
    config = config or BenchConfig()
    for variant in variants:
        variant.runner.validate_feeds(variant.feeds)
    warm = _warm_up(variants, config.warmup_ms)
    runs = _timed(variants, config, progress, more)
    results = []
    for variant, (wq, wms), its in zip(variants, warm, runs):
        walltime = its[-1].end_ms - its[0].start_ms if len(variants) == 1 else sum(it.host_ms for it in its)
        results.append(
            BenchResult(
                name=variant.name,
                backend=variant.runner.backend,
                config=config,
                warmup_queries=wq,
                warmup_ms=wms,
                iterations=its,
                walltime_ms=walltime,
                interleaved_with=len(variants),
                input_shapes={name: tuple(array.shape) for name, array in variant.feeds.items()},
            )
        )
    return results


def run(runner: Runner, feeds: Feeds, config: BenchConfig | None = None, name: str = "model") -> BenchResult:
    """Time one active runner on `feeds`, as trtexec times one engine."""
    return run_interleaved([Variant(name, runner, feeds)], config)[0]
