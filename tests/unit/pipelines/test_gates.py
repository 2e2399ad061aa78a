"""The promote stage's load gate judges what Locust measured, bound by bound.

Invariants: a run within every bound passes and its reason lists each number against its bound; a
breach of any one bound (error ratio, TTFT p95, tokens/s, too few calls) fails, naming it; a bound
with nothing measured for it (no stream delivered a token) fails rather than passing silently; an
unset bound is not checked; Locust's CSV is read into the same numbers (generation calls only, tokens
from the content size, TTFT/ITL p95 from the token entries).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.stages.gates import GateVerdict, LoadBounds, LoadMeasurement, judge_load, read_locust_csv

BOUNDS = LoadBounds(max_error_ratio=0.01, max_ttft_p95_ms=500, min_tokens_per_second=20, min_requests=4)


def measured(**changes: float) -> LoadMeasurement:
    values = {
        "requests": 40,
        "failures": 0,
        "ttft_p95_ms": 120.0,
        "itl_p95_ms": 9.0,
        "tokens": 640,
        "seconds": 8.0,
    }
    values.update(changes)
    return LoadMeasurement(**values)  # type: ignore[arg-type]


def test_a_run_within_every_bound_passes_with_its_numbers() -> None:
    verdict = judge_load(measured(), BOUNDS)
    assert verdict.passed and verdict.gate == "load"
    assert verdict.numbers["tokens_per_second"] == 80.0 and verdict.numbers["error_ratio"] == 0.0
    for text in ("error ratio 0", "TTFT p95 ms 120", "tokens/s 80", "calls 40"):
        assert text in verdict.reason, verdict.reason


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"failures": 2}, "error ratio 0.05"),
        ({"ttft_p95_ms": 900.0}, "TTFT p95 ms 900"),
        ({"tokens": 80}, "tokens/s 10"),
        ({"requests": 3, "tokens": 600}, "calls 3"),
        ({"ttft_p95_ms": math.nan}, "TTFT p95 ms nothing measured"),
        ({"requests": 0, "tokens": 0}, "error ratio nothing measured"),
    ],
)
def test_any_breach_fails_the_gate_naming_it(changes: dict[str, float], named: str) -> None:
    verdict = judge_load(measured(**changes), BOUNDS)
    assert not verdict.passed
    assert verdict.reason.startswith("breached: ") and named in verdict.reason, verdict.reason
    assert verdict.line().startswith("load gate FAILED: breached")


def test_unset_bounds_are_not_checked() -> None:
    verdict = judge_load(measured(ttft_p95_ms=math.nan, tokens=1), LoadBounds(max_error_ratio=None))
    assert verdict.passed and "TTFT" not in verdict.reason and "tokens/s" not in verdict.reason


def test_bounds_come_from_params() -> None:
    bounds = LoadBounds.from_params({"max_error_ratio": 0.05, "max_ttft_p95_ms": 2000, "min_requests": 3})
    assert bounds == LoadBounds(0.05, 2000.0, None, 3)


def test_locust_csv_is_read_into_the_measurement(tmp_path: Path) -> None:
    header = "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,95%"
    rows = [
        "grpc,serving.GenerateStream,10,2,300,310,200,900,12.8,1.2,0.2,300,800",
        "grpc,serving.ListModels,5,1,3,3,2,5,0,0.6,0.1,3,5",
        "token,TTFT,8,0,90,95,60,200,1,1,0,90,180",
        "token,ITL,120,0,8,8,5,30,1,15,0,8,14",
        ",Aggregated,143,3,8,8,5,900,1,18,0.3,8,300",
    ]
    (tmp_path / "locust_stats.csv").write_text("\n".join([header, *rows]) + "\n")
    got = read_locust_csv(tmp_path / "locust", 8.0)
    assert (got.requests, got.failures, got.tokens) == (10, 2, 128)  # ListModels is not a generation
    assert (got.ttft_p95_ms, got.itl_p95_ms, got.error_ratio, got.tokens_per_second) == (
        180.0,
        14.0,
        0.2,
        16.0,
    )


def test_a_verdict_line_says_passed_or_failed() -> None:
    assert GateVerdict("evaluation", True, "m:2 wins").line() == "evaluation gate passed: m:2 wins"
