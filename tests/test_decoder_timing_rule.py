"""The KV-cache decoder candidates' timing stopping rule (exporter/cpu_engine_stage.py): rounds go on only
while the fastest passing candidate is not told apart from another passing one; the score interval is the
medians' distribution-free ~95% intervals combined as the score is. Synthetic latencies (no timing here)."""

from __future__ import annotations

import pytest

from engines import stats
from engines.benchmark import Iteration
from exporter.cpu_engine_stage import (
    DECODE_STEPS_RANKED,
    DECODER_TIMING,
    FIRST_DECODER_ROUNDS,
    MIN_DECODER_ROUNDS,
    score_interval,
    still_timed,
    unresolved,
)


def _its(latencies: list[float]) -> list[Iteration]:
    return [Iteration(0.0, ms) for ms in latencies]


def test_score_interval_combines_medians_and_interval_ends():
    prefill, decode = [50.0, 52.0, 51.0, 60.0, 49.0, 50.5], [4.0, 4.2, 3.9, 4.1, 4.0, 5.0]
    median, low, high = score_interval(_its(prefill), _its(decode))
    p_low, p_high = stats.median_ci(sorted(prefill))
    d_low, d_high = stats.median_ci(sorted(decode))
    assert median == pytest.approx(stats.median(sorted(prefill)) + 64 * stats.median(sorted(decode)))
    assert (low, high) == (p_low + 64 * d_low, p_high + 64 * d_high)
    assert DECODE_STEPS_RANKED == 64
    # 6 rounds: the interval is the whole range (~97% for the median), so the rule never stops earlier
    assert (low, high) == (49.0 + 64 * 3.9, 60.0 + 64 * 5.0)
    assert DECODER_TIMING.iterations == FIRST_DECODER_ROUNDS == 3 and DECODER_TIMING.max_iterations == 10
    assert MIN_DECODER_ROUNDS == 6


def test_clearly_separated_candidates_need_no_more_rounds():
    scores = {
        "ort-int8": (310.0, 300.0, 330.0),
        "ort-fp32": (583.0, 560.0, 600.0),
        "ov": (770.0, 700.0, 800.0),
    }
    assert unresolved(scores, set(scores)) == set()


def test_an_overlapping_rival_keeps_itself_and_the_leader_timed_only():
    scores = {"a": (310.0, 300.0, 330.0), "b": (320.0, 305.0, 340.0), "c": (770.0, 700.0, 800.0)}
    assert unresolved(scores, set(scores)) == {"a", "b"}


def test_candidates_failing_their_gate_are_not_contested():
    """A faster candidate that fails its gate cannot be chosen: the contest is among the passing ones."""
    scores = {"fails": (100.0, 90.0, 400.0), "a": (310.0, 300.0, 330.0), "b": (583.0, 560.0, 600.0)}
    assert unresolved(scores, {"a", "b"}) == set()
    assert unresolved(scores, {"fails", "a", "b"}) == {"fails", "a"}  # b: 560 > 400, told apart
    assert unresolved(scores, set()) == {"fails", "a"}  # none passes: all in the contest


def test_the_leader_gets_its_minimum_rounds_and_clear_losers_stop_after_the_first():
    """After the first 3 rounds, candidates told apart from the fastest passing one stop; the fastest goes on to
    6 rounds (its latency is the reported one), an overlapping rival with it."""
    apart = {"a": (310.0, 300.0, 330.0), "b": (583.0, 560.0, 600.0), "c": (770.0, 700.0, 800.0)}
    rounds = {"a": 3, "b": 3, "c": 3}
    assert still_timed(apart, set(apart), rounds) == {"a"}
    assert still_timed(apart, set(apart), {**rounds, "a": 6}) == set()
    close = {**apart, "b": (320.0, 305.0, 340.0)}
    assert still_timed(close, set(close), rounds) == {"a", "b"}
    assert still_timed(close, set(close), {"a": 6, "b": 6, "c": 3}) == {"a", "b"}  # until told apart (or 10)
    assert still_timed(apart, {"b", "c"}, rounds) == {"b"}  # the leader is the fastest passing one
