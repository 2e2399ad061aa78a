"""Per-version SLI windows of the router: what a rollout is judged on.

Invariants: a window counts only samples inside it, per (model, version); errors are server-side
codes only; an inter-token delta of n tokens is n samples of gap/n; samples past the retention
are dropped; the Prometheus histograms get every sample under {model, version}.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from llmops.common.domain import ResolvedModel
from llmops.router.metrics import RouterMetrics
from llmops.router.slis import VersionSlis

V1, V2 = ResolvedModel("tiny", 1, "champion"), ResolvedModel("tiny", 2, "challenger")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_counts_per_version_and_drops_old_samples() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    slis = VersionSlis(metrics.ttft, metrics.inter_token, retention_seconds=60, clock=clock)
    for i in range(20):
        slis.first_token(V1, 0.010 + i * 0.001)  # 10..29 ms
        slis.outcome(V1, "OK")
    slis.outcome(V1, "INVALID_ARGUMENT")  # the caller's mistake: not an error of the version
    slis.outcome(V2, "INTERNAL")
    slis.outcome(V2, "OK")
    slis.inter_token(V2, 0.030, tokens=3)  # three samples of 10 ms
    slis.outcome(None, "UNAVAILABLE")  # no version: nothing recorded
    clock.now += 30
    slis.first_token(V2, 0.5)

    stats, span = slis.window("tiny", 10)
    assert span == 10
    assert [(s.version, s.requests, s.ttft_samples) for s in stats] == [(2, 0, 1)]
    stats, _ = slis.window("tiny", 0)  # the whole retention
    one, two = stats
    assert (one.version, one.requests, one.errors, one.ttft_samples) == (1, 21, 0, 20)
    assert (
        abs(one.ttft_p95_seconds - 0.028) < 1e-9
    )  # nearest rank: the 19th of 20 and abs(one.ttft_p50_seconds - 0.019) < 1e-9
    assert (two.requests, two.errors, two.error_ratio, two.inter_token_samples) == (2, 1, 0.5, 3)
    assert abs(two.inter_token_p95_seconds - 0.010) < 1e-9
    assert slis.window("other", 0)[0] == []

    clock.now += 45  # V1's samples are 75 s old now, V2's TTFT 45 s
    assert [s.version for s in slis.window("", 0)[0]] == [2]
    assert (
        registry.get_sample_value("llmops_router_ttft_seconds_count", {"model": "tiny", "version": "1"}) == 20
    )
    assert (
        registry.get_sample_value(
            "llmops_router_inter_token_seconds_count", {"model": "tiny", "version": "2"}
        )
        == 3
    )


def test_series_are_bounded() -> None:
    slis = VersionSlis(max_samples=100)
    for _ in range(1000):
        slis.first_token(V1, 0.01)
        slis.outcome(V1, "OK")
    (stats,), _ = slis.window("tiny", 0)
    assert (stats.requests, stats.ttft_samples) == (100, 100)
