"""Prometheus metrics of a job service, read from its job book at scrape time.

Every value is derived from the jobs the service holds, so nothing can drift from the API's view:
jobs by state (``<prefix>_jobs{state}``) and finished jobs by method and result
(``<prefix>_jobs_finished_total{method,result}``, a count that only grows while the process
lives). Every (method, result) pair of the service's methods is exported from the start, at 0,
so "failed jobs in the last hour" reads 0 rather than no data before the first failure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmops.common.jobs import JobState

#: Job state -> the ``state`` label (the dashboards' vocabulary).
STATE_LABELS = {
    JobState.QUEUED: "pending",
    JobState.RUNNING: "running",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}
RESULTS = ("succeeded", "failed", "cancelled")


class _Job(Protocol):
    @property
    def state(self) -> JobState: ...


JobT = TypeVar("JobT", bound=_Job)


class JobBookCollector(Collector, Generic[JobT]):  # type: ignore[misc]
    """``jobs`` by state and finished jobs by method and result, plus what ``extra`` adds."""

    def __init__(
        self,
        jobs: Callable[[], list[JobT]],
        *,
        what: str,  # "Training", "Quantization"
        jobs_metric: str,
        finished_metric: str,
        methods: Sequence[str],
        method_of: Callable[[JobT], str],
        extra: Callable[[list[JobT]], Iterable[Metric]] = lambda _: (),
    ) -> None:
        self._jobs = jobs
        self._what = what
        self._jobs_metric = jobs_metric
        self._finished_metric = finished_metric.removesuffix("_total")
        self._methods = tuple(methods)
        self._method_of = method_of
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        jobs = self._jobs()
        by_state = GaugeMetricFamily(self._jobs_metric, f"{self._what} jobs by state.", labels=["state"])
        states = Counter(STATE_LABELS[j.state] for j in jobs)
        for label in STATE_LABELS.values():
            by_state.add_metric([label], states[label])
        finished = CounterMetricFamily(
            self._finished_metric,
            f"{self._what} jobs that ended, by method and result (succeeded | failed | cancelled).",
            labels=["method", "result"],
        )
        ended = Counter((self._method_of(j), STATE_LABELS[j.state]) for j in jobs if j.state.terminal)
        methods = list(dict.fromkeys([*self._methods, *(method for method, _ in ended)]))
        for method in methods:
            for result in RESULTS:
                finished.add_metric([method, result], ended[(method, result)])
        yield by_state
        yield finished
        yield from self._extra(jobs)
