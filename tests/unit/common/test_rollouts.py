"""Rollout spec validation and SLO judging (llmops.common.rollouts).

Invariants: defaults fill an empty spec (5/25/50/100, 60 s, 50 requests, ratio SLOs); a spec that
cannot run is InvalidArgument naming its field; a challenger is judged against absolute bounds and
against the champion over the same window, latency SLIs without samples are not judged, and one
error of slack keeps a single transient failure from rolling back.
"""

from __future__ import annotations

import pytest

from llmops.common.errors import InvalidArgument
from llmops.common.rollouts import (
    DEFAULT_SLOS,
    RolloutSpec,
    SloBound,
    Slos,
    Window,
    check_spec,
    evaluate,
    quantile,
)


def test_defaults() -> None:
    spec = check_spec(RolloutSpec("m", 2))
    assert (spec.steps, spec.step_min_seconds, spec.step_min_requests, spec.slos) == (
        (5, 25, 50, 100),
        60.0,
        50,
        DEFAULT_SLOS,
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": (50, 50, 100)}, "spec.steps[1]"),
        ({"steps": (10, 90)}, "spec.steps"),
        ({"steps": tuple(range(1, 101))}, "spec.steps"),
        ({"to_version": 0}, "spec.to_version"),
        ({"step_min_seconds": float("inf")}, "spec.step_min_seconds"),
        ({"step_min_requests": -1}, "spec.step_min_requests"),
        (
            {"slos": Slos(inter_token_p95_seconds=SloBound(max_ratio=0.5))},
            "spec.slos.inter_token_p95_seconds.max_ratio",
        ),
        ({"slos": Slos(error_ratio=SloBound(max_value=2))}, "spec.slos.error_ratio.max_value"),
        ({"slos": Slos(ttft_p95_seconds=SloBound(max_value=-1))}, "spec.slos.ttft_p95_seconds.max_value"),
        ({"slos": Slos()}, "spec.slos"),
    ],
)
def test_bad_specs(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_spec(RolloutSpec(**{"model_name": "m", "to_version": 2, **change}))  # type: ignore[arg-type]
    assert caught.value.field == field


def test_evaluate_absolute_and_ratio_bounds() -> None:
    slos = Slos(SloBound(0.5, 1.2), SloBound(0, 1.2), SloBound(0.05, 2.0))
    champion = Window(1, requests=100, errors=0, ttft_p95_seconds=0.10, inter_token_p95_seconds=0.01,
                      ttft_samples=100, inter_token_samples=800)  # fmt: skip
    same = Window(2, requests=50, errors=1, ttft_p95_seconds=0.11, inter_token_p95_seconds=0.0119,
                  ttft_samples=50, inter_token_samples=400)  # fmt: skip
    assert all(c.met for c in evaluate(slos, champion, same))  # one error of slack

    slow = Window(2, requests=50, ttft_p95_seconds=0.125, inter_token_p95_seconds=0.01,
                  ttft_samples=50, inter_token_samples=400)  # fmt: skip
    checks = {c.sli: c for c in evaluate(slos, champion, slow)}
    assert not checks["ttft_p95_seconds"].met and "1.25x" in checks["ttft_p95_seconds"].detail
    assert checks["inter_token_p95_seconds"].met and checks["error_ratio"].met

    failing = Window(2, requests=50, errors=5, ttft_p95_seconds=0.1, inter_token_p95_seconds=0.01,
                     ttft_samples=45, inter_token_samples=300)  # fmt: skip
    checks = {c.sli: c for c in evaluate(slos, champion, failing)}
    assert not checks["error_ratio"].met and "above 0.05" in checks["error_ratio"].detail

    unmeasured = Window(2, requests=50)  # unary traffic only: latency not judged, errors are
    assert [c.detail for c in evaluate(slos, champion, unmeasured)][:2] == ["no samples", "no samples"]


def test_quantile_nearest_rank() -> None:
    assert quantile([], 0.95) == 0.0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.95) == 95.0
