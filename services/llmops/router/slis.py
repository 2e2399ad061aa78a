"""Per-version SLIs the router measures on every request it forwards: sliding windows of time to
first token, inter-token latency and outcomes per (model, version), plus the Prometheus histograms
``llmops_router_ttft_seconds{model,version}`` and ``llmops_router_inter_token_seconds{model,version}``.

The windows are what a rollout controller judges a step on (:meth:`VersionSlis.window`): the router
sees every request and the version that answered it the moment it ends, with no scrape interval
and no histogram buckets between the measurement and the decision, and both versions' numbers come
from the same span of time. Samples older than ``retention_seconds`` are dropped, and each series
keeps at most ``max_samples`` (oldest dropped first), so memory stays bounded under any load.

A request counts once per attempt on the version that served it: an attempt that fails on a
challenger replica is the challenger's error even when the router retries it elsewhere. Errors are
server-side codes only (:data:`ERROR_CODES`); a caller's INVALID_ARGUMENT says nothing of a version.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Histogram

from llmops.common.domain import ResolvedModel
from llmops.common.rollouts import quantile

ERROR_CODES = frozenset(
    {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "DATA_LOSS"}
)
Key = tuple[str, int]


@dataclass(frozen=True)
class VersionStats:
    """One version's SLIs over a window."""

    model_name: str
    version: int
    requests: int
    errors: int
    ttft_samples: int
    ttft_p50_seconds: float
    ttft_p95_seconds: float
    inter_token_samples: int
    inter_token_p50_seconds: float
    inter_token_p95_seconds: float
    ttft_values: tuple[float, ...] = ()
    inter_token_values: tuple[float, ...] = ()

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class VersionSlis:
    """Sliding windows per (model name, version), and the histograms beside them."""

    def __init__(
        self,
        ttft: Histogram | None = None,
        inter_token: Histogram | None = None,
        *,
        retention_seconds: float = 600.0,
        max_samples: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retention_seconds = retention_seconds
        self._max = max_samples
        self._clock = clock
        self._ttft_hist = ttft
        self._itl_hist = inter_token
        self._outcomes: dict[Key, deque[tuple[float, bool]]] = {}
        self._ttft: dict[Key, deque[tuple[float, float]]] = {}
        self._itl: dict[Key, deque[tuple[float, float]]] = {}

    def _series(self, table: dict[Key, deque[tuple[float, float]]], key: Key) -> deque[tuple[float, float]]:
        series = table.get(key)
        if series is None:
            series = table[key] = deque(maxlen=self._max)
        return series

    # --- recording (the hot path: appends only) ----------------------------------------------------

    def outcome(self, model: ResolvedModel | None, code: str) -> None:
        """One attempt on ``model`` ended with ``code`` (a gRPC status name); None: no version."""
        if model is None or not model.version:
            return
        key = (model.name, model.version)
        series = self._outcomes.get(key)
        if series is None:
            series = self._outcomes[key] = deque(maxlen=self._max)
        series.append((self._clock(), code in ERROR_CODES))

    def first_token(self, model: ResolvedModel | None, seconds: float) -> None:
        if model is None or not model.version:
            return
        self._series(self._ttft, (model.name, model.version)).append((self._clock(), seconds))
        if self._ttft_hist is not None:
            self._ttft_hist.labels(model.name, str(model.version)).observe(seconds)

    def inter_token(self, model: ResolvedModel | None, seconds: float, tokens: int = 1) -> None:
        """A delta of ``tokens`` tokens arrived ``seconds`` after the previous one: one sample per token."""
        if model is None or not model.version or tokens <= 0:
            return
        per_token = seconds / tokens
        series = self._series(self._itl, (model.name, model.version))
        now = self._clock()
        for _ in range(min(tokens, 64)):
            series.append((now, per_token))
            if self._itl_hist is not None:
                self._itl_hist.labels(model.name, str(model.version)).observe(per_token)

    # --- reading -----------------------------------------------------------------------------------

    def window(self, model_name: str = "", seconds: float = 0.0) -> tuple[list[VersionStats], float]:
        """Each version's SLIs over the last ``seconds`` (0 or more than the retention: the retention).

        Returns the stats sorted by (model, version) and the window length actually covered.
        """
        span = self.retention_seconds if seconds <= 0 else min(seconds, self.retention_seconds)
        now = self._clock()
        since = now - span
        self._expire(now - self.retention_seconds)
        keys = sorted(
            k for k in {*self._outcomes, *self._ttft, *self._itl} if not model_name or k[0] == model_name
        )
        stats = []
        for key in keys:
            outcomes = [failed for t, failed in self._outcomes.get(key, ()) if t >= since]
            ttft = [v for t, v in self._ttft.get(key, ()) if t >= since]
            itl = [v for t, v in self._itl.get(key, ()) if t >= since]
            if not outcomes and not ttft:
                continue
            stats.append(
                VersionStats(
                    model_name=key[0],
                    version=key[1],
                    requests=len(outcomes),
                    errors=sum(outcomes),
                    ttft_samples=len(ttft),
                    ttft_p50_seconds=quantile(ttft, 0.5),
                    ttft_p95_seconds=quantile(ttft, 0.95),
                    inter_token_samples=len(itl),
                    inter_token_p50_seconds=quantile(itl, 0.5),
                    inter_token_p95_seconds=quantile(itl, 0.95),
                    ttft_values=tuple(ttft),
                    inter_token_values=tuple(itl),
                )
            )
        return stats, span

    def _expire(self, cutoff: float) -> None:
        for table in (self._outcomes, self._ttft, self._itl):
            for key in list(table):
                series = table[key]
                while series and series[0][0] < cutoff:
                    series.popleft()
                if not series:
                    del table[key]
