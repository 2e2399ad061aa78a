"""Job-book metrics shared by the job services.

Invariants: every state and every (method, result) pair of the service's methods is exported from
the first scrape, at 0; counts follow the job book; a method the list does not name still shows up
once a job of it ends; the quantization service exports its jobs under its own names.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, generate_latest

from llmops.common import metric_names as names
from llmops.common.job_metrics import JobBookCollector
from llmops.common.jobs import JobState
from llmops.quantization.metrics import register_metrics


@dataclasses.dataclass
class _Job:
    method: str
    state: JobState


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_states_and_results_are_exported_from_the_start_and_follow_the_book() -> None:
    jobs: list[_Job] = []
    registry = CollectorRegistry()
    registry.register(
        JobBookCollector(
            lambda: list(jobs), what="Things", jobs_metric="things_jobs", finished_metric="things_jobs_finished_total",
            methods=["a", "b"], method_of=lambda job: job.method,
        )
    )  # fmt: skip
    assert _value(registry, "things_jobs", state="running") == 0
    assert _value(registry, "things_jobs_finished_total", method="b", result="failed") == 0
    jobs += [_Job("a", JobState.RUNNING), _Job("a", JobState.FAILED), _Job("c", JobState.SUCCEEDED)]
    assert _value(registry, "things_jobs", state="running") == 1
    assert _value(registry, "things_jobs", state="pending") == 0
    assert _value(registry, "things_jobs_finished_total", method="a", result="failed") == 1
    assert _value(registry, "things_jobs_finished_total", method="c", result="succeeded") == 1
    assert _value(registry, "things_jobs_finished_total", method="c", result="cancelled") == 0


def test_quantization_exports_its_job_book() -> None:
    @dataclasses.dataclass
    class Spec:
        quantization: object

    @dataclasses.dataclass
    class QJob:
        spec: Spec
        state: JobState

    method = type("Q", (), {"method": "int8_dynamic"})()
    registry = CollectorRegistry()
    book = [QJob(Spec(method), JobState.SUCCEEDED)]
    register_metrics(registry, lambda: book, ["gptq", "int8_dynamic"])  # type: ignore[arg-type, return-value]
    text = generate_latest(registry).decode()
    assert f'{names.QUANTIZATION_JOBS}{{state="succeeded"}} 1.0' in text
    assert f'{names.QUANTIZATION_JOBS_FINISHED_TOTAL}{{method="int8_dynamic",result="succeeded"}} 1.0' in text
    assert f'{names.QUANTIZATION_JOBS_FINISHED_TOTAL}{{method="gptq",result="failed"}} 0.0' in text
