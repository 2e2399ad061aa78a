"""Job bodies on threads of the service process: for unit tests and single-process development.

A thread cannot be killed, so :meth:`ThreadAttempt.kill` sets the stop flag and stops waiting for
it; torch releases the GIL in its kernels, so training in a thread does not stall the server.
"""

from __future__ import annotations

import threading
from typing import Any

from llmops.training.domain import Resources, WorkerPlan
from llmops.training.runners.base import (
    DEFAULT_BODY,
    Attempt,
    Body,
    JobRunner,
    Outcome,
    WorkerCore,
    load_body,
    outcome_of,
)


class ThreadAttempt(Attempt):
    def __init__(self, core: WorkerCore, plan: WorkerPlan) -> None:
        self._core = core
        self._cursor = 0
        self._raw: dict[str, Any] | None = None
        self._killed = False
        self._thread = threading.Thread(
            target=self._run, args=(plan,), name=f"train-{plan.job_id}", daemon=True
        )
        self._thread.start()

    def _run(self, plan: WorkerPlan) -> None:
        self._raw = self._core.run(plan.to_dict())

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], Outcome | None]:
        finished = not self._thread.is_alive()
        events = self._core.events(self._cursor, 0.0 if finished else timeout)
        self._cursor += len(events)
        if self._killed:
            return events, Outcome("cancelled")
        if finished:  # it ended before the fetch, so the fetch got every event
            assert self._raw is not None
            return events, outcome_of(self._raw)
        return events, None

    def request_cancel(self) -> None:
        self._core.cancel()

    def kill(self) -> None:
        self._core.cancel()
        self._killed = True


class ThreadRunner(JobRunner):
    def __init__(self, body: Body | str = DEFAULT_BODY) -> None:
        self._body = load_body(body) if isinstance(body, str) else body

    def start(self, plan: WorkerPlan, resources: Resources) -> Attempt:
        return ThreadAttempt(WorkerCore(self._body), plan)

    def accelerator(self) -> tuple[bool, bool]:
        import torch

        cuda = bool(torch.cuda.is_available())
        return cuda, cuda and bool(torch.cuda.is_bf16_supported())
