"""Training's side of the runner interface; the runner code itself is :mod:`llmops.common.runners`.

What is training's own is the plan: a training :class:`JobRunner` starts a :class:`WorkerPlan`,
which crosses to the worker as ``WorkerPlan.to_dict()`` and reaches the body as a ``WorkerPlan``
again; a CUDA plan gets one GPU when its job names none. An attempt whose process disappeared ends
as ``lost``; the service then resumes the job from its last checkpoint.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Any

from llmops.common import runners as common
from llmops.common.runners.base import Attempt, Emit, Outcome, WorkerCore, load_body, outcome_of
from llmops.training.domain import Resources, WorkerPlan

__all__ = [
    "DEFAULT_BODY",
    "Attempt",
    "Body",
    "JobRunner",
    "Outcome",
    "PlanRunner",
    "WorkerCore",
    "load_body",
    "outcome_of",
    "typed_body",
]

#: A training job body: called with the plan as a ``WorkerPlan``.
Body = Callable[[WorkerPlan, Emit, threading.Event], dict[str, Any]]
#: The body Ray workers import (it takes the plan as a dict or a ``WorkerPlan``).
DEFAULT_BODY = "llmops.training.worker:train"


class JobRunner(abc.ABC):
    """Starts attempts of training jobs."""

    @abc.abstractmethod
    def start(self, plan: WorkerPlan, resources: Resources) -> Attempt:
        """Start ``plan`` on a worker with ``resources`` (it may wait for them); must not block."""

    def accelerator(self) -> tuple[bool, bool]:
        """Whether workers have a CUDA GPU, and whether it does BF16. Default: CPU only."""
        return False, False

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the runner's own resources (running attempts are the service's to stop)."""

    def max_workers(self) -> int:
        """Most data-parallel workers one job may have here. Default: one."""
        return 1

    def reattach(self, job_id: str, cursor: int) -> Attempt | None:
        """A running attempt of ``job_id`` that outlived a previous service, read on from worker event
        ``cursor``; None when there is none (the default: attempts die with the service)."""
        return None

    def reconcile(self, running: set[str]) -> list[str]:
        """Stop attempts that outlived a previous service for jobs not in ``running``; their ids."""
        return []


class PlanRunner(JobRunner):
    """A training runner over a common one: ``WorkerPlan`` -> dict, a GPU for a CUDA plan."""

    def __init__(self, runner: common.JobRunner) -> None:
        self.runner = runner

    def start(self, plan: WorkerPlan, resources: Resources) -> Attempt:
        if plan.device == "cuda" and not resources.gpus:
            resources = dataclasses.replace(resources, gpus=1.0)
        return self.runner.start(plan.job_id, plan.to_dict(), resources)

    def accelerator(self) -> tuple[bool, bool]:
        return self.runner.accelerator()

    def shutdown(self) -> None:
        self.runner.shutdown()


def typed_body(body: Body) -> common.Body:
    """``body`` as the common runners call it: with the plan as a dict."""

    @functools.wraps(body)
    def run(plan: dict[str, Any], emit: Emit, stop: threading.Event) -> dict[str, Any]:
        return body(WorkerPlan.from_dict(plan), emit, stop)

    return run
