"""Prometheus metrics of the training service, read from the job book at scrape time.

Names from :mod:`llmops.common.metric_names`. Jobs by state and finished jobs by method and result
come from the shared :class:`~llmops.common.job_metrics.JobBookCollector`; training adds the loss
of each method's running jobs (else its newest job's final loss) and their summed tokens/s
(per-job curves live in MLflow; a job-id label would be unbounded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from llmops.common import metric_names as names
from llmops.common.job_metrics import JobBookCollector
from llmops.training.domain import METHODS, Job, JobState


def _running(jobs: list[Job]) -> Iterator[Metric]:
    loss = GaugeMetricFamily(
        names.TRAINING_LAST_LOSS,
        "Loss at the latest logged step of a method's running jobs (the highest), else of its newest job.",
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
        if not losses:  # between jobs the panel keeps the last job's final loss, not a gap
            ended = [j for j in jobs if j.spec.method == method and "loss" in j.latest_metrics]
            losses = [max(ended, key=lambda j: j.created_at).latest_metrics["loss"]] if ended else []
        if losses:
            loss.add_metric([method], max(losses))
        rate.add_metric([method], sum(j.latest_metrics.get("tokens_per_second", 0.0) for j in mine))
    yield from (loss, rate)


def register_metrics(registry: CollectorRegistry, jobs: Callable[[], list[Job]]) -> JobBookCollector[Job]:
    collector = JobBookCollector(
        jobs,
        what="Training",
        jobs_metric=names.TRAINING_JOBS,
        finished_metric=names.TRAINING_JOBS_FINISHED_TOTAL,
        methods=METHODS,
        method_of=lambda job: job.spec.method,
        extra=_running,
    )
    registry.register(collector)
    return collector
