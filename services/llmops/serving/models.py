"""The table of served models: each engine with its bounded queue and its in-flight requests.

:class:`Admission` lets ``capacity`` requests into an engine at once (the engine's own batch size)
and queues at most ``max_waiting`` more; one more gets RESOURCE_EXHAUSTED with a retry hint instead
of an unbounded wait. A finished, failed or cancelled request always gives its slot back.

:class:`ServedModel` tracks the requests running on a model so an unload can wait for them to drain
and then abort the rest. An abort interrupts a request only where its task waits on the queue or on
the engine (:meth:`InFlight.interruptible`); anywhere else (a transport writing the last delta, a
cache lookup) the request sees :attr:`InFlight.aborted` when it comes back for the next output.
Cancelling a task at an arbitrary await would let the cancellation escape into the transport, which
reads it as the client going away and never ends the call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from llmops.common.errors import DeadlineExceeded, ResourceExhausted
from llmops.serving.coldstart import ColdStart
from llmops.serving.domain import (
    EngineOptions,
    LoadedAdapter,
    ModelInfo,
    ModelState,
    ResolvedModel,
)
from llmops.serving.engines.base import Engine

#: What a client is told to wait before retrying a request refused by a full queue.
RETRY_AFTER_SECONDS = 1.0


class Admission:
    """A bounded queue in front of one engine.

    Args:
        capacity: requests the engine works on at once.
        max_waiting: requests allowed to wait for a slot; one more is refused.
    """

    def __init__(self, capacity: int, max_waiting: int) -> None:
        self.capacity = max(1, capacity)
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(self.capacity)
        self.waiting = 0
        self.running = 0

    async def acquire(self, timeout: float | None = None) -> None:
        """Take a slot, waiting in the queue if there is room in it.

        Raises:
            ResourceExhausted: the queue is full.
            DeadlineExceeded: no slot came free within ``timeout`` seconds.
        """
        if (self._slots.locked() or self.waiting) and self.waiting >= self.max_waiting:
            raise ResourceExhausted(
                f"{self.waiting} requests already wait for this model (limit {self.max_waiting}); retry later",
                retry_after_seconds=RETRY_AFTER_SECONDS,
            )
        self.waiting += 1
        try:
            if timeout is None:
                await self._slots.acquire()
            else:
                try:
                    await asyncio.wait_for(self._slots.acquire(), timeout)
                except TimeoutError:
                    raise DeadlineExceeded(
                        "the deadline passed while the request waited in the queue"
                    ) from None
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        """Give a slot back."""
        self.running -= 1
        self._slots.release()


@dataclass(eq=False)
class InFlight:
    """One request running on a model."""

    aborted: bool = False
    tokens: int = 0  # prompt + generated so far: what the tenant is charged
    _waiting: asyncio.Task[object] | None = None

    def abort(self) -> None:
        """Stop it: its completions end with finish reason ABORT."""
        if self.aborted:
            return
        self.aborted = True
        if self._waiting is not None and not self._waiting.done():
            self._waiting.cancel()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Around one wait on the queue or the engine: an abort cancels it, and it raises :class:`Aborted`."""
        if self.aborted:
            raise Aborted
        task = asyncio.current_task()
        self._waiting = task
        try:
            yield
        except asyncio.CancelledError:
            if not self.aborted or task is None:
                raise  # the client went away
            task.uncancel()
            raise Aborted from None
        finally:
            self._waiting = None


class Aborted(Exception):
    """The request was aborted by an unload while it waited."""


@dataclass(eq=False)
class ServedModel:
    """A model in the table: its engine, queue, state and what it was loaded from."""

    info: ModelInfo
    engine: Engine | None = None
    admission: Admission | None = None
    requests: set[InFlight] = field(default_factory=set)
    adapters: dict[str, LoadedAdapter] = field(default_factory=dict)
    load_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None
    #: This load's cold-start phases, until its first request's first token is observed.
    cold_start: ColdStart | None = None
    #: The resolved folder while this entry holds it (a node-cache entry is not evicted meanwhile).
    weights_path: Path | None = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def served_name(self) -> str:
        return self.info.served_name

    @property
    def state(self) -> ModelState:
        return self.info.state

    def set_state(self, state: ModelState, error: str = "") -> None:
        loaded_at = datetime.now(UTC) if state is ModelState.READY else self.info.loaded_at
        self.info = replace(self.info, state=state, error_message=error, loaded_at=loaded_at)

    def snapshot(self) -> ModelInfo:
        """The model as ListModels reports it now."""
        adapters = tuple(self.adapters[name] for name in sorted(self.adapters))
        max_len = (
            self.engine.max_model_len if self.engine is not None and self.state is ModelState.READY else 0
        )
        return replace(self.info, adapters=adapters, max_model_len=max_len or self.info.max_model_len)

    def enter(self) -> InFlight:
        request = InFlight()
        self.requests.add(request)
        self._idle.clear()
        return request

    def leave(self, request: InFlight) -> None:
        self.requests.discard(request)
        if not self.requests:
            self._idle.set()

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for in-flight requests, then abort the rest; returns how many."""
        if self.requests:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        remaining = list(self.requests)
        for request in remaining:
            request.abort()
        if remaining:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 10.0)
        return len(remaining)


def new_entry(
    served_name: str,
    engine: Engine,
    options: EngineOptions,
    *,
    local_path: str = "",
    model: ResolvedModel | None = None,
    model_format: str = "",
    follow_alias: bool = False,
) -> ServedModel:
    """A LOADING entry for an engine about to start."""
    info = ModelInfo(
        served_name=served_name,
        engine=engine.kind,
        state=ModelState.LOADING,
        options=options,
        local_path=local_path,
        model=model,
        format=model_format,
        follow_alias=follow_alias,
    )
    return ServedModel(info=info, engine=engine)
