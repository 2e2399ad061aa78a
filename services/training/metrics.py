"""Prometheus metrics of the training service, read from the job book at scrape time.

Names from :mod:`llmops.common.metric_names`. Every value is derived from the jobs the service
holds, so nothing can drift from the API's view: jobs by state, finished jobs by method and result
(a count that only grows while the process lives), and the loss and summed tokens/s of the running
jobs of each method (per-job curves live in MLflow; a job-id label would be unbounded).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmops.common import metric_names as names
from llmops.training.domain import METHODS, Job, JobState

_STATES = {
    JobState.QUEUED: "pending",
    JobState.RUNNING: "running",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


class TrainingCollector(Collector):  # type: ignore[misc]
    def __init__(self, jobs: Callable[[], list[Job]]) -> None:
        self._jobs = jobs

    def collect(self) -> Iterator[Metric]:
        jobs = self._jobs()
        by_state = GaugeMetricFamily(names.TRAINING_JOBS, "Training jobs by state.", labels=["state"])
        states = Counter(_STATES[j.state] for j in jobs)
        for state in _STATES.values():
            by_state.add_metric([state], states[state])
        finished = CounterMetricFamily(
            names.TRAINING_JOBS_FINISHED_TOTAL.removesuffix("_total"),
            "Training jobs that ended, by method and result (succeeded | failed | cancelled).",
            labels=["method", "result"],
        )
        ended = Counter((j.spec.method, _STATES[j.state]) for j in jobs if j.state.terminal)
        for method in METHODS:
            for result in ("succeeded", "failed", "cancelled"):
                finished.add_metric([method, result], ended[(method, result)])
        loss = GaugeMetricFamily(
            names.TRAINING_LAST_LOSS,
            "Loss at the latest logged step of a running job of a method.",
            labels=["method"],
        )
        rate = GaugeMetricFamily(
            names.TRAINING_TOKENS_PER_SECOND,
            "Training throughput of the running jobs of a method, summed, in tokens per second.",
            labels=["method"],
        )
        running = [j for j in jobs if j.state is JobState.RUNNING]
        for method in METHODS:
            mine = [j for j in running if j.spec.method == method]
            losses = [j.latest_metrics["loss"] for j in mine if "loss" in j.latest_metrics]
            if losses:
                loss.add_metric([method], max(losses))
            rate.add_metric([method], sum(j.latest_metrics.get("tokens_per_second", 0.0) for j in mine))
        yield from (by_state, finished, loss, rate)


def register_metrics(registry: CollectorRegistry, jobs: Callable[[], list[Job]]) -> TrainingCollector:
    collector = TrainingCollector(jobs)
    registry.register(collector)
    return collector
