"""What one arm's run at one rung measured: latency, throughput, cache hits, balance, decisions.

Engine and router counters are read before and after each run from the processes' ``/metrics``
(the differences belong to that run alone: runs never overlap). TTFT percentiles are over the
*steady-state* requests: a group's first request (a tenant's first question, a user's first turn)
must compute its prefix whatever the policy, so it is left out of the percentiles of every arm
alike and reported apart (``ttft_p90_all_s`` keeps every request).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.gate import median, percentile
from benchmarks.router.client import Outcome
from benchmarks.router.fleet import histogram_quantile, total
from benchmarks.router.workloads import Schedule

HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
FINISHED = "vllm:request_success_total"
DECISIONS = "llmops_router_decisions_total"
DECISION_SECONDS = "llmops_router_decision_seconds"


@dataclass(frozen=True)
class RunResult:
    """One arm, one rung, one repeat."""

    workload: str
    arm: str
    rate: float
    repeat: int
    requests: int
    succeeded: int
    success_rate: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    ttft_p90_all_s: float
    throughput_rps: float  # successful requests per second, first send to last completion
    tokens_per_s: float
    prefix_hit_rate: float  # engines' hits / queries, summed over replicas
    ideal_hit_rate: float  # what an infinite cache shared by all replicas would hit
    per_replica: tuple[int, ...]  # requests each replica finished
    balance: float  # max over mean of per_replica
    spills: int  # prefix-affinity decisions that left a saturated holder
    decision_p99_s: float
    wall_s: float

    @property
    def hit_share_of_ideal(self) -> float:
        return self.prefix_hit_rate / self.ideal_hit_rate if self.ideal_hit_rate > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_share_of_ideal": self.hit_share_of_ideal}


def steady_state(schedule: Schedule) -> set[int]:
    """Indexes of the requests whose prefix an earlier request of the run already sent."""
    seen: set[int] = set()
    steady = set()
    for request in schedule.requests:
        if request.group < 0:
            steady.add(request.index)  # zero reuse: no first-of-group to leave out
        elif request.group in seen:
            steady.add(request.index)
        seen.add(request.group)
    return steady


def summarize(
    *,
    workload: str,
    arm: str,
    repeat: int,
    schedule: Schedule,
    wall: float,
    outcomes: Sequence[Outcome],
    engines_before: Sequence[dict[str, float]],
    engines_after: Sequence[dict[str, float]],
    router_before: dict[str, float],
    router_after: dict[str, float],
    ideal: tuple[int, int],
) -> RunResult:
    ok = [o for o in outcomes if o.status == "OK"]
    steady = steady_state(schedule)
    ttft = [o.ttft for o in ok if o.index in steady]
    every = [o.ttft for o in ok]
    span = max(o.sent_at + o.duration for o in ok) - min(o.sent_at for o in outcomes) if ok else wall
    hits = sum(total(a, HITS) - total(b, HITS) for a, b in zip(engines_after, engines_before, strict=True))
    queries = sum(
        total(a, QUERIES) - total(b, QUERIES) for a, b in zip(engines_after, engines_before, strict=True)
    )
    per_replica = tuple(
        round(total(a, FINISHED) - total(b, FINISHED))
        for a, b in zip(engines_after, engines_before, strict=True)
    )
    mean = sum(per_replica) / len(per_replica) if per_replica else 0.0
    spills = sum(
        v - router_before.get(k, 0.0)
        for k, v in router_after.items()
        if k.startswith(DECISIONS + "{") and 'outcome="spill"' in k
    )
    return RunResult(
        workload=workload,
        arm=arm,
        rate=schedule.rate,
        repeat=repeat,
        requests=len(outcomes),
        succeeded=len(ok),
        success_rate=len(ok) / len(outcomes) if outcomes else math.nan,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p90_s=percentile(ttft, 90),
        ttft_p99_s=percentile(ttft, 99),
        ttft_p90_all_s=percentile(every, 90),
        throughput_rps=len(ok) / span if span > 0 else math.nan,
        tokens_per_s=sum(o.tokens for o in ok) / span if span > 0 else math.nan,
        prefix_hit_rate=hits / queries if queries > 0 else math.nan,
        ideal_hit_rate=ideal[0] / ideal[1] if ideal[1] else math.nan,
        per_replica=per_replica,
        balance=max(per_replica) / mean if mean > 0 else math.nan,
        spills=round(spills),
        decision_p99_s=histogram_quantile(router_before, router_after, DECISION_SECONDS, 0.99),
        wall_s=wall,
    )


def medians_by(results: Sequence[RunResult], field: str) -> dict[tuple[str, str, float], float]:
    """The median of ``field`` over repeats, per (workload, arm, rate)."""
    groups: dict[tuple[str, str, float], list[float]] = {}
    for r in results:
        groups.setdefault((r.workload, r.arm, r.rate), []).append(float(getattr(r, field)))
    return {key: median(values) for key, values in groups.items()}


def knee_throughput(results: Sequence[RunResult], workload: str, arm: str) -> float:
    """Throughput at the knee: the most successful requests per second the arm sustained on the
    ladder (median over repeats at each rung, then the best rung)."""
    by_rate = medians_by([r for r in results if r.workload == workload and r.arm == arm], "throughput_rps")
    return max(by_rate.values(), default=math.nan)
