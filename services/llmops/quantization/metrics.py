"""Prometheus metrics of the quantization service, read from the job book at scrape time.

``llmops_quantization_jobs{state}`` and ``llmops_quantization_jobs_finished_total{method,result}``
(names from :mod:`llmops.common.metric_names`), through the shared
:class:`~llmops.common.job_metrics.JobBookCollector`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from llmops.common import metric_names as names
from llmops.common.job_metrics import JobBookCollector
from llmops.quantization.domain import Job


def register_metrics(
    registry: CollectorRegistry, jobs: Callable[[], list[Job]], methods: Sequence[str]
) -> JobBookCollector[Job]:
    collector = JobBookCollector(
        jobs,
        what="Quantization",
        jobs_metric=names.QUANTIZATION_JOBS,
        finished_metric=names.QUANTIZATION_JOBS_FINISHED_TOTAL,
        methods=methods,
        method_of=lambda job: job.spec.quantization.method,
    )
    registry.register(collector)
    return collector
