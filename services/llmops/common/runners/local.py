"""Job bodies on threads of the service process: for unit tests and single-process development.

A thread cannot be killed, so :meth:`ThreadAttempt.kill` sets the stop flag and stops waiting for
it; torch releases the GIL in its kernels, so a job body in a thread does not stall the server.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from llmops.common.runners.base import (
    Attempt,
    Body,
    JobRunner,
    Outcome,
    Resources,
    WorkerCore,
    load_body,
    outcome_of,
)


class ThreadAttempt(Attempt):
    def __init__(self, core: WorkerCore, job_id: str, plan: Mapping[str, Any]) -> None:
        self._core = core
        self._cursor = 0
        self._raw: dict[str, Any] | None = None
        self._killed = False
        self._thread = threading.Thread(
            target=self._run, args=(dict(plan),), name=f"job-{job_id}", daemon=True
        )
        self._thread.start()

    def _run(self, plan: dict[str, Any]) -> None:
        self._raw = self._core.run(plan)

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
    """Runs ``body`` (a function, or ``"package.module:function"``) in a new thread per attempt."""

    def __init__(self, body: Body | str) -> None:
        self._body = load_body(body) if isinstance(body, str) else body

    def start(self, job_id: str, plan: Mapping[str, Any], resources: Resources) -> Attempt:
        return ThreadAttempt(WorkerCore(self._body), job_id, plan)

    def accelerator(self) -> tuple[bool, bool]:
        import torch

        cuda = bool(torch.cuda.is_available())
        return cuda, cuda and bool(torch.cuda.is_bf16_supported())
