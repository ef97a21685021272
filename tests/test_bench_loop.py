"""The timing loop's semantics (counts, interleaving, the GPU hook) and the PyTorch runner."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from bench_models import INPUT_NAMES, VOCAB, tiny_torch_encoder

from engines import bench_cli, benchmark
from engines.base import Runner, TensorSpec
from engines.benchmark import BenchConfig, BenchResult, DeviceTimes, Iteration, Variant
from engines.torch_runner import TorchRunner
from export_errors import InputError

FAST = BenchConfig(warmup_ms=1, iterations=12, duration_s=0, avg_runs=4, percentiles=(50.0, 99.0))


class EchoRunner(Runner):
    """A trivial CPU runner: returns its input as float."""

    backend = "echo"

    def _activate(self) -> None:
        return None

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec("x", np.dtype(np.float32), ("n",))]

    @property
    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec("y", np.dtype(np.float32), ("n",))]

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": feeds["x"] * 2}


class DeviceTimedEcho(EchoRunner):
    """Implements the GPU hook with fixed device times, to exercise the GPU summary path's layout."""

    backend = "fake-gpu"

    def infer_with_device_times(
        self, feeds: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], DeviceTimes]:
        return self.infer(feeds), DeviceTimes(h2d_ms=0.5, compute_ms=0.25, d2h_ms=0.125, enqueue_ms=0.05)


FEEDS = {"x": np.ones(4, np.float32)}


def test_counts_follow_trtexec_semantics() -> None:
    with EchoRunner() as runner:
        result = benchmark.run(runner, FEEDS, FAST)
    assert len(result.iterations) == 12  # duration 0: exactly the minimum iteration count
    assert result.warmup_queries >= 1 and result.warmup_ms >= 1
    assert len(result.averages()) == 3
    starts = [it.start_ms for it in result.iterations]
    assert starts == sorted(starts) and all(it.latency_ms >= 0 for it in result.iterations)
    assert result.walltime_ms == pytest.approx(result.iterations[-1].end_ms - result.iterations[0].start_ms)


def test_duration_extends_past_the_iteration_count() -> None:
    config = BenchConfig(warmup_ms=0, iterations=1, duration_s=0.05)
    with EchoRunner() as runner:
        result = benchmark.run(runner, FEEDS, config)
    assert result.iterations[-1].end_ms >= 49.0 and len(result.iterations) > 1  # wallclock, as trtexec


def test_interleaved_variants_alternate_and_sum_their_own_spans() -> None:
    with EchoRunner() as a, EchoRunner() as b:
        results = benchmark.run_interleaved([Variant("a", a, FEEDS), Variant("b", b, FEEDS)], FAST)
    merged = sorted((it.start_ms, r.name) for r in results for it in r.iterations)
    assert [name for _, name in merged[:6]] == ["a", "b"] * 3
    for r in results:
        assert r.interleaved_with == 2
        assert r.walltime_ms == pytest.approx(sum(it.host_ms for it in r.iterations))


def test_feeds_are_validated_before_timing() -> None:
    with EchoRunner() as runner, pytest.raises(InputError, match="dtype"):
        benchmark.run(runner, {"x": np.ones(4, np.int64)}, FAST)


def test_gpu_hook_gives_trtexec_gpu_lines_and_transfer_warning() -> None:
    with DeviceTimedEcho() as runner:
        result = benchmark.run(runner, FEEDS, FAST)
    assert result.iterations[0].latency_ms == 0.875  # H2D + compute + D2H, as trtexec
    lines = bench_cli.summary_lines(result)
    labels = [line.split(":")[0] for line in lines[1:]]
    assert labels == [
        "Throughput",
        "Latency",
        "Enqueue Time",
        "H2D Latency",
        "GPU Compute Time",
        "D2H Latency",
        "Total Host Walltime",
        "Total GPU Compute Time",
    ]
    assert lines[5] == (
        "GPU Compute Time: min = 0.25 ms, max = 0.25 ms, mean = 0.25 ms, median = 0.25 ms, "
        "percentile(50%) = 0.25 ms, percentile(99%) = 0.25 ms"
    )
    assert lines[-1] == "Total GPU Compute Time: 0.003 s"  # 12 x 0.25 ms
    warnings = bench_cli.warning_lines(result)
    assert warnings == [
        "* Throughput may be bound by host-to-device transfers for the inputs rather than GPU "
        "Compute and the GPU may be under-utilized."
    ]
    assert set(result.to_dict()) >= {"h2dMs", "gpuComputeMs", "d2hMs", "totalGpuComputeS"}


def _synthetic(latencies: list[float]) -> BenchResult:
    its, t = [], 0.0
    for lat in latencies:
        its.append(Iteration(t, t + lat))
        t += lat
    return BenchResult("s", "cpu", FAST, 1, 1.0, its, t)


def test_cov_warning_only_when_unstable() -> None:
    assert bench_cli.warning_lines(_synthetic([10.0, 10.05] * 10)) == []  # CoV 0.25 %
    warning = bench_cli.warning_lines(_synthetic([10.0, 12.0] * 10))  # CoV 9.09 %
    assert re.fullmatch(r"\* Latency is unstable, with coefficient of variation = 9\.0909\d*%\.", warning[0])


@pytest.mark.parametrize(
    "kwargs",
    [{"iterations": 0}, {"warmup_ms": -1}, {"duration_s": -1}, {"avg_runs": 0}, {"percentiles": (101.0,)}],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BenchConfig(**kwargs)  # type: ignore[arg-type]


def test_torch_runner_matches_the_module_and_restores_threads() -> None:
    module = tiny_torch_encoder()
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 5))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    before = torch.get_num_threads()
    with TorchRunner(module, INPUT_NAMES, ["last_hidden_state"], threads=1) as runner:
        assert torch.get_num_threads() == 1
        out = runner.infer(feeds)["last_hidden_state"]
        with pytest.raises(InputError, match="input_ids"):
            runner.infer(feeds | {"input_ids": ids.astype(np.int32)})
    assert torch.get_num_threads() == before
    with torch.no_grad():
        expected = module(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)).numpy()
    np.testing.assert_array_equal(out, expected)
    assert runner.backend == "pytorch" and [s.name for s in runner.input_specs] == INPUT_NAMES


def test_stopping_rule_stops_on_a_confident_median_or_the_cap() -> None:
    """Past the minimum, a variant runs until its median is known within ±median_rel_ci, at most
    max_iterations (the rule alone, on fixed timings: no clock in a pass/fail test)."""

    def its(values: list[float]) -> list[Iteration]:
        return [Iteration(0.0, v) for v in values]

    rule = BenchConfig(warmup_ms=0, iterations=5, duration_s=0, median_rel_ci=0.05, max_iterations=20)
    assert benchmark._confident(its([10.0] * 12), rule)
    assert not benchmark._confident(its([5.0, 15.0] * 6), rule)  # ±50%: keep going
    assert benchmark._confident(its([5.0, 15.0] * 10), rule)  # the cap
    assert benchmark._confident(its([5.0, 15.0] * 6), BenchConfig(iterations=5))  # rule off: trtexec's budget
    with EchoRunner() as runner:  # the loop honours it: a constant-output runner stops at the minimum or soon
        result = benchmark.run(runner, FEEDS, dataclasses.replace(rule, median_rel_ci=10.0))
    assert len(result.iterations) == 5


def test_median_ci_is_distribution_free_order_statistics() -> None:
    from engines import stats

    values = list(range(1, 101))  # n = 100: ranks 50 -/+ 9.8 -> [x(40), x(60)] 0-based
    assert stats.median_ci(values) == (41.0, 61.0)
    assert stats.median_ci([3.0]) == (3.0, 3.0)
    assert stats.median_ci_relative([10.0] * 12) == 0.0


def test_more_times_only_the_variants_the_callers_rule_names_up_to_max_iterations() -> None:
    """`more` (a caller's stopping rule) is asked once every variant has `iterations`: the variants it
    names get one more query per round, none past `max_iterations`; an empty answer stops the loop."""
    config = dataclasses.replace(FAST, iterations=3, max_iterations=7)
    asked: list[tuple[int, ...]] = []

    def more(runs):  # type: ignore[no-untyped-def]
        asked.append(tuple(len(r) for r in runs))
        return {1, 2} if len(runs[1]) < 5 else {2}

    with EchoRunner() as a, EchoRunner() as b, EchoRunner() as c:
        variants = [Variant(n, r, FEEDS) for n, r in (("a", a), ("b", b), ("c", c))]
        results = benchmark.run_interleaved(variants, config, more=more)
    assert [len(r.iterations) for r in results] == [3, 5, 7]
    assert asked[0] == (3, 3, 3)  # first asked when the config's own rule is met


def test_more_returning_nothing_keeps_the_fixed_count() -> None:
    config = dataclasses.replace(FAST, iterations=4, max_iterations=10)
    with EchoRunner() as a, EchoRunner() as b:
        results = benchmark.run_interleaved(
            [Variant("a", a, FEEDS), Variant("b", b, FEEDS)], config, more=lambda runs: set()
        )
    assert [len(r.iterations) for r in results] == [4, 4]
