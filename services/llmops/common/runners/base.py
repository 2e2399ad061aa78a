"""The runner interface: start a job body somewhere, poll its events, cancel or kill it.

A runner starts one :class:`Attempt` per try of a job. The body runs inside a :class:`WorkerCore`
(the same in a Ray actor and in a thread): it buffers the body's events with a sequence cursor,
long-polls them out, carries the stop flag, and turns how the body ended into an outcome dict, so no
exception has to cross a process boundary. An attempt whose process disappeared ends as ``lost``;
what happens then (resume, retry, fail) is the service's call.

The plan is a plain JSON-able dict, so it crosses into a worker process as is; each service turns
its own typed plan into one and back (training's ``WorkerPlan.to_dict`` / ``from_dict``). A body is
``body(plan, emit, stop) -> result``: ``emit`` takes event dicts (``{"kind": ..., ...}``), ``stop``
is set when the job is to stop, which the body answers by raising :class:`Cancelled`; the result is
a JSON-able dict too.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

Emit = Callable[[dict[str, Any]], None]
Body = Callable[[dict[str, Any], Emit, threading.Event], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one worker of a job asks for (``llmops.common.v1.Resources``); zero: the runner's default."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory_bytes: int = 0
    accelerator_type: str = ""


class Cancelled(Exception):
    """The job was asked to stop (a body raises it once it sees ``stop`` set)."""


def worker_name() -> str:
    """Where a body runs, as the ``started`` event reports it: ``<host> pid <pid>``."""
    return f"{socket.gethostname()} pid {os.getpid()}"


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


class CancelDeadline:
    """How a supervisor enforces a cancel: ask the worker once, kill it after ``grace_seconds``.

    An attempt whose worker has not started yet has nothing to save and is killed at once.
    """

    def __init__(self, grace_seconds: float) -> None:
        self._grace = grace_seconds
        self._asked_at: float | None = None

    def enforce(self, attempt: Attempt, started: bool) -> Outcome | None:
        """Call on every poll while a cancel is requested; ``Outcome("cancelled")`` once it is over."""
        if not started:
            attempt.kill()
            return Outcome("cancelled")
        if self._asked_at is None:
            attempt.request_cancel()
            self._asked_at = time.monotonic()
        elif time.monotonic() - self._asked_at > self._grace:
            attempt.kill()
            return Outcome("cancelled")
        return None


class JobRunner(abc.ABC):
    """Starts attempts of jobs."""

    @abc.abstractmethod
    def start(self, job_id: str, plan: Mapping[str, Any], resources: Resources) -> Attempt:
        """Start the body on ``plan`` on a worker with ``resources`` (it may wait for them); must not
        block. ``job_id`` names the worker (thread name, actor's name in Ray's logs)."""

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
        self._done = False

    def run(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return self._run(dict(plan))
        finally:
            with self._changed:  # a poll waiting for events learns at once that none will come
                self._done = True
                self._changed.notify_all()

    def _run(self, plan: dict[str, Any]) -> dict[str, Any]:
        self.emit({"kind": "started", "worker": worker_name()})
        try:
            result = self._body(plan, self.emit, self._stop)
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
        """Events from index ``since``, waiting up to ``wait`` s when there are none yet (and the
        body still runs)."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._events) > since or self._done, timeout=wait)
            return list(self._events[since:])

    def cancel(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()


def outcome_of(raw: Mapping[str, Any]) -> Outcome:
    return Outcome(kind=raw["outcome"], result=raw.get("result"), reason=raw.get("reason", ""))
