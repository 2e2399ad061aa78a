"""Threshold checks of a load test run (pure logic, no Locust).

Invariant: a run within every limit has no violation; each exceeded limit is one violation naming
it; token timings (TTFT/ITL) never count as calls; a limit with nothing measured fails; percentiles
are Locust's (so a gate agrees with the report people read).
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from loadtests.thresholds import (
    EntryStats,
    Thresholds,
    evaluate,
    merged,
    percentile,
    violations,
)


def entry(kind: str, name: str, times: dict[int, int], failures: int = 0) -> EntryStats:
    return EntryStats(kind, name, sum(times.values()), failures, times)


RUN = [
    entry("grpc", "serving.Generate", {100: 90, 200: 10}, failures=1),
    entry("grpc", "serving.GenerateStream", {150: 50}),
    entry("grpc", "serving.ListModels", {2: 40}),
    entry("token", "TTFT", {20: 45, 60: 5}),
    entry("token", "TTFT (cached)", {1: 10}),
    entry("token", "ITL", {5: 500}),
]


def failed_names(thresholds: Thresholds) -> list[str]:
    return [check.name for check in violations(evaluate(RUN, thresholds))]


def test_a_run_within_its_limits_passes() -> None:
    limits = Thresholds(max_error_ratio=0.01, max_p95_ttft_ms=60, max_p95_latency_ms=200)
    checks = evaluate(RUN, limits)
    assert [c.name for c in checks] == ["calls", "error ratio", "p95 TTFT", "p95 latency"]
    assert violations(checks) == []


def test_each_exceeded_limit_is_named() -> None:
    assert failed_names(Thresholds(max_error_ratio=0.001)) == ["error ratio"]
    assert failed_names(Thresholds(max_p95_ttft_ms=19)) == ["p95 TTFT"]
    assert failed_names(Thresholds(max_p95_latency_ms=100)) == ["p95 latency"]
    assert failed_names(Thresholds(max_error_ratio=0.0, max_p95_ttft_ms=0.0001, max_p95_latency_ms=1)) == [
        "error ratio",
        "p95 TTFT",
        "p95 latency",
    ]


def test_the_error_ratio_counts_calls_not_token_timings() -> None:
    (_, ratio, *_) = evaluate(RUN, Thresholds())
    assert ratio.observed == 1 / 190  # 100 + 50 + 40 calls; the 560 TTFT/ITL timings are not calls


def test_p95_ttft_covers_cache_replays_and_p95_latency_only_generations() -> None:
    checks = {c.name: c for c in evaluate(RUN, Thresholds(max_p95_ttft_ms=1e9, max_p95_latency_ms=1e9))}
    assert checks["p95 TTFT"].observed == 60  # 60 values, 10 cached at 1 ms: the 58th is in the slow tail
    assert checks["p95 latency"].observed == 200  # ListModels' 2 ms calls are not generations


def test_a_limit_with_nothing_measured_fails() -> None:
    control_only = [entry("grpc", "serving.ListModels", {2: 10})]
    (check,) = violations(evaluate(control_only, Thresholds(max_p95_ttft_ms=1000)))
    assert check.name == "p95 TTFT"
    assert math.isnan(check.observed)
    assert "nothing measured" in str(check) and "FAILED" in str(check)


def test_a_run_without_calls_fails() -> None:
    names = [c.name for c in violations(evaluate([], Thresholds()))]
    assert names == ["calls", "error ratio"]


def test_switched_off_limits_are_not_checked() -> None:
    checks = evaluate(RUN, Thresholds(max_error_ratio=None))
    assert [c.name for c in checks] == ["calls"]


def test_check_text_says_what_was_measured_against_what() -> None:
    (check,) = violations(evaluate(RUN, Thresholds(max_error_ratio=None, max_p95_ttft_ms=0.0001)))
    assert str(check) == "p95 TTFT: 60 ms (limit <= 0.0001 ms) FAILED"


@given(st.dictionaries(st.integers(0, 10_000), st.integers(1, 50), min_size=1), st.floats(0, 1))
def test_percentile_is_lockstep_with_a_sorted_list(times: dict[int, int], percent: float) -> None:
    """Locust's rule: the value at 0-based rank int(n * percent) of the sorted values (the last at 1)."""
    values = sorted(v for v, count in times.items() for _ in range(count))
    assert percentile(times, percent) == values[min(int(len(values) * percent), len(values) - 1)]


def test_merged_adds_buckets() -> None:
    assert merged([entry("token", "a", {1: 2, 3: 1}), entry("token", "b", {1: 1})]) == {1: 3, 3: 1}
    assert math.isnan(percentile({}, 0.95))
