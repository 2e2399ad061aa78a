"""Pass/fail limits for a load test run, so a run can gate a rollout (pure: no Locust import).

The locustfile hands :func:`evaluate` one :class:`EntryStats` per Locust statistics entry when Locust
quits, and exits with :data:`EXIT_THRESHOLD` when any check fails. What each limit reads:

* error ratio: failed calls / calls, over the ``grpc`` entries only (``TTFT``/``ITL`` are timings
  taken from streams, not calls, and would dilute it);
* p95 TTFT: over every ``TTFT`` entry (engine answers and cache replays together: what users saw);
* p95 latency: over every generation call (``serving.Generate*``, unary and streamed, cache hits
  included), the whole call's time;
* at least ``min_requests`` calls: a run that made none proves nothing.

A limit set but with nothing measured for it (a p95 TTFT limit on a run without streams) fails: the
gate cannot say the limit held. Percentiles follow Locust's own (its rounded response-time buckets),
so they match the numbers in its report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

RPC_TYPE = "grpc"
TOKEN_TYPE = "token"
GENERATION_PREFIX = "serving.Generate"
TTFT_PREFIX = "TTFT"
#: Process exit code of a run whose thresholds were exceeded (1 is Locust's for failed requests,
#: 2 the locustfile's for a target it cannot reach).
EXIT_THRESHOLD = 3


@dataclass(frozen=True)
class EntryStats:
    """One Locust statistics entry: ``response_times`` maps rounded milliseconds to counts."""

    request_type: str
    name: str
    requests: int
    failures: int
    response_times: Mapping[int, int]


@dataclass(frozen=True)
class Thresholds:
    """Limits; ``None`` switches one off."""

    max_error_ratio: float | None = 0.01
    max_p95_ttft_ms: float | None = None
    max_p95_latency_ms: float | None = None
    min_requests: int = 1


@dataclass(frozen=True)
class Check:
    """One limit held against what the run measured (``observed`` is NaN when nothing was)."""

    name: str
    observed: float
    limit: float
    unit: str = ""
    at_least: bool = False

    @property
    def failed(self) -> bool:
        if math.isnan(self.observed):
            return True
        return self.observed < self.limit if self.at_least else self.observed > self.limit

    def __str__(self) -> str:
        observed = "nothing measured" if math.isnan(self.observed) else f"{self.observed:g}{self.unit}"
        relation = ">=" if self.at_least else "<="
        verdict = "FAILED" if self.failed else "ok"
        return f"{self.name}: {observed} (limit {relation} {self.limit:g}{self.unit}) {verdict}"


def percentile(response_times: Mapping[int, int], percent: float) -> float:
    """The response time ``percent`` (0-1) of the calls finished within, as Locust computes it."""
    total = sum(response_times.values())
    if total == 0:
        return math.nan
    allowed_above = int(total * percent)
    seen = 0
    for value in sorted(response_times, reverse=True):
        seen += response_times[value]
        if total - seen <= allowed_above:
            return float(value)
    return 0.0


def merged(entries: Iterable[EntryStats]) -> dict[int, int]:
    """Response-time buckets of several entries added together."""
    out: dict[int, int] = {}
    for entry in entries:
        for value, count in entry.response_times.items():
            out[value] = out.get(value, 0) + count
    return out


def evaluate(entries: Iterable[EntryStats], thresholds: Thresholds) -> list[Check]:
    """Every check the thresholds ask for, in a fixed order; see :attr:`Check.failed`."""
    entries = list(entries)
    rpcs = [e for e in entries if e.request_type == RPC_TYPE]
    calls = sum(e.requests for e in rpcs)
    checks = [Check("calls", float(calls), float(thresholds.min_requests), at_least=True)]
    if thresholds.max_error_ratio is not None:
        ratio = sum(e.failures for e in rpcs) / calls if calls else math.nan
        checks.append(Check("error ratio", ratio, thresholds.max_error_ratio))
    if thresholds.max_p95_ttft_ms is not None:
        ttft = [e for e in entries if e.request_type == TOKEN_TYPE and e.name.startswith(TTFT_PREFIX)]
        checks.append(Check("p95 TTFT", percentile(merged(ttft), 0.95), thresholds.max_p95_ttft_ms, " ms"))
    if thresholds.max_p95_latency_ms is not None:
        generations = [e for e in rpcs if e.name.startswith(GENERATION_PREFIX)]
        p95 = percentile(merged(generations), 0.95)
        checks.append(Check("p95 latency", p95, thresholds.max_p95_latency_ms, " ms"))
    return checks


def violations(checks: Iterable[Check]) -> list[Check]:
    return [check for check in checks if check.failed]
