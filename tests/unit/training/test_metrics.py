"""Training's job-book metrics: loss and throughput per method.

Invariants: the loss is the running jobs' (the highest of them); with none running it is the newest
job's final loss, so the panel keeps a value between jobs; throughput sums the running jobs only.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry

from llmops.training.domain import Job, JobState
from llmops.training.metrics import register_metrics
from tests.unit.training.test_convert import FULL


def _job(n: int, state: JobState, loss: float, rate: float = 100.0) -> Job:
    return Job(id=f"tj-{n}", spec=FULL, created_at=float(n), state=state,
               latest_metrics={"loss": loss, "tokens_per_second": rate})  # fmt: skip


def _read(jobs: list[Job]) -> tuple[float | None, float | None]:
    registry = CollectorRegistry()
    register_metrics(registry, lambda: jobs)
    labels = {"method": FULL.method}
    return (
        registry.get_sample_value("llmops_training_last_loss", labels),
        registry.get_sample_value("llmops_training_tokens_per_second", labels),
    )


def test_running_jobs_set_the_loss_and_the_newest_job_keeps_it_between_jobs() -> None:
    older, newer = _job(1, JobState.SUCCEEDED, 2.0), _job(2, JobState.FAILED, 1.5)
    assert _read([older, newer]) == (1.5, 0.0)
    running = [_job(3, JobState.RUNNING, 0.9, 300.0), _job(4, JobState.RUNNING, 1.1, 200.0)]
    assert _read([older, newer, *running]) == (1.1, 500.0)
    assert _read([]) == (None, 0.0)
    other = dataclasses.replace(newer, spec=dataclasses.replace(FULL, method="sft"))
    assert _read([other]) == (None, 0.0)  # another method's job says nothing about this one
