"""Fault injection: a serving replica made worse on purpose (a testing feature, off by default).

``serving.faults`` (:class:`~llmops.common.settings.ServingFaults`) adds latency before the first
token and between tokens, and fails a seeded share of generations before their first token with
INTERNAL. It wraps the engine's token stream inside :class:`~llmops.serving.service.ServingService`,
so unary Generate, GenerateStream and the OpenAI HTTP API all see the same faults, and the service's
own TTFT / inter-token histograms measure them as a client would.

Why INTERNAL and not UNAVAILABLE: the router retries UNAVAILABLE on another replica and takes the
replica out of rotation, which would hide the fault from the error ratio that a rollout watches and
starve the faulty version of traffic. INTERNAL is answered to the caller as is, counted by the
router under its code, and leaves the replica in rotation.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable

import grpc

from llmops.common.errors import LLMOpsError
from llmops.common.settings import ServingFaults
from llmops.serving.domain import EngineOutput

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class InjectedFault(LLMOpsError):
    """A generation failed by ``serving.faults.error_ratio`` (never a real failure)."""

    code = grpc.StatusCode.INTERNAL


class FaultInjector:
    """Applies :class:`ServingFaults` to engine token streams.

    Args:
        faults: the settings; :meth:`from_settings` returns ``None`` when none is set.
        sleep: the wait used for added latency (tests pass a recorder).
    """

    def __init__(self, faults: ServingFaults, *, sleep: Sleep = asyncio.sleep) -> None:
        self.faults = faults
        self._ttft = faults.ttft_delay_ms / 1000.0
        self._itl = faults.inter_token_delay_ms / 1000.0
        self._rng = random.Random(faults.seed)
        self._sleep = sleep
        self.injected_errors = 0

    @classmethod
    def from_settings(cls, faults: ServingFaults) -> FaultInjector | None:
        """An injector when any fault is set, else ``None`` (the default: no wrapper at all)."""
        return cls(faults) if faults.enabled else None

    def warn(self) -> None:
        """The loud start-up line: a replica with faults must never pass unnoticed."""
        log.warning(
            "FAULT INJECTION IS ON (serving.faults, a testing feature): %s; this replica is "
            "deliberately slow or failing",
            self.faults.describe(),
        )

    def fails_next(self) -> bool:
        """Draw whether the next generation fails (one draw per generation, in arrival order)."""
        return self.faults.error_ratio > 0 and self._rng.random() < self.faults.error_ratio

    async def wrap(self, stream: AsyncGenerator[EngineOutput, None]) -> AsyncGenerator[EngineOutput, None]:
        """``stream`` with the faults applied; closing the result closes ``stream`` (aborts it)."""
        fail = self.fails_next()
        try:
            if self._ttft:
                await self._sleep(self._ttft)
            if fail:
                self.injected_errors += 1
                raise InjectedFault(
                    "injected fault (serving.faults.error_ratio): this replica fails on purpose"
                )
            first = True
            async for output in stream:
                carries_tokens = any(delta.token_ids for delta in output.deltas)
                if carries_tokens and not first and self._itl:
                    await self._sleep(self._itl)
                if carries_tokens:
                    first = False
                yield output
        finally:
            await stream.aclose()
