"""The runner interface: start a job body somewhere, poll its events, cancel or kill it.

A runner starts one :class:`Attempt` per try of a job. The body runs inside a :class:`WorkerCore`
(the same in a Ray actor and in a thread): it buffers the body's events with a sequence cursor,
long-polls them out, carries the stop flag, and turns how the body ended into an outcome dict, so no
exception has to cross a process boundary. An attempt whose process disappeared ends as ``lost``;
the service then resumes the job from its last checkpoint.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from llmops.training.domain import Resources, WorkerPlan

Body = Callable[[WorkerPlan, Callable[[dict[str, Any]], None], threading.Event], dict[str, Any]]
DEFAULT_BODY = "llmops.training.worker:train"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an attempt ended: ``lost`` means its worker process went away mid-job."""

    kind: Literal["succeeded", "failed", "cancelled", "lost"]
    result: dict[str, Any] | None = None
    reason: str = ""


class Attempt(abc.ABC):
    """One try of a job on a worker."""

    @abc.abstractmethod
    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], Outcome | None]:
        """New events (waiting up to ``timeout`` s for some) and the outcome once the body ended."""

    @abc.abstractmethod
    def request_cancel(self) -> None:
        """Ask the body to stop at its next check (it then ends ``cancelled``)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the worker now and free its resources."""


class JobRunner(abc.ABC):
    """Starts attempts of jobs."""

    @abc.abstractmethod
    def start(self, plan: WorkerPlan, resources: Resources) -> Attempt:
        """Start ``plan`` on a worker with ``resources`` (it may wait for them); must not block."""

    def accelerator(self) -> tuple[bool, bool]:
        """Whether workers have a CUDA GPU, and whether it does BF16. Default: CPU only."""
        return False, False

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the runner's own resources (running attempts are the service's to stop)."""


def load_body(path: str) -> Body:
    """``"package.module:function"`` -> the function."""
    module, _, name = path.partition(":")
    body: Body = getattr(importlib.import_module(module), name)
    return body


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:400]}" if text else type(error).__name__


class WorkerCore:
    """Runs a body, buffers its events, and answers event polls and cancels from other threads."""

    def __init__(self, body: Body) -> None:
        self._body = body
        self._events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()

    def run(self, plan: dict[str, Any]) -> dict[str, Any]:
        from llmops.training.worker import Cancelled, worker_name

        self.emit({"kind": "started", "worker": worker_name()})
        try:
            result = self._body(WorkerPlan.from_dict(plan), self.emit, self._stop)
        except Cancelled:
            return {"outcome": "cancelled"}
        except Exception as error:  # the job fails, the worker reports why
            if self._stop.is_set():
                return {"outcome": "cancelled"}
            self.emit({"kind": "log", "level": "error", "message": _one_line(error)})
            return {"outcome": "failed", "reason": _one_line(error)}
        return {"outcome": "succeeded", "result": result}

    def emit(self, event: dict[str, Any]) -> None:
        with self._changed:
            self._events.append({"time": time.time(), **event})
            self._changed.notify_all()

    def events(self, since: int, wait: float = 0.0) -> list[dict[str, Any]]:
        """Events from index ``since``, waiting up to ``wait`` s when there are none yet."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._events) > since, timeout=wait)
            return list(self._events[since:])

    def cancel(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()


def outcome_of(raw: dict[str, Any]) -> Outcome:
    return Outcome(kind=raw["outcome"], result=raw.get("result"), reason=raw.get("reason", ""))
