"""Counts of what each fault test did to the system and what the clients saw, for the closing summary.

Every request a fault test sends is classified once: answered OK (and correct), answered with a
status the fault allows (``UNAVAILABLE`` from a dead dependency, say), or lost — no answer within its
bound, an answer that is wrong or corrupt, or a status the fault does not allow. The goal is
``lost == 0``. :func:`record` keeps one line per fault; ``tests/faults/conftest.py`` prints them at
the end of the run (``faults: redis-kill injected=1 requests=240 ok=240 allowed=0 lost=0 ...``).
The killed training worker is tested (and recorded) in ``tests/integration/training/test_faults.py``;
its line shows when that test runs in the same session as this folder
(``pytest tests/faults tests/integration/training/test_faults.py -m faults``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from llmops.common.errors import LLMOpsError

T = TypeVar("T")


@dataclass
class FaultCounts:
    """One fault's tally. ``codes`` counts every non-OK status seen, allowed or not."""

    fault: str
    injected: int = 0
    requests: int = 0
    ok: int = 0
    allowed: int = 0
    lost: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    def line(self) -> str:
        codes = ",".join(f"{k}:{v}" for k, v in sorted(self.codes.items())) or "-"
        return (
            f"faults: {self.fault} injected={self.injected} requests={self.requests} ok={self.ok} "
            f"allowed={self.allowed} lost={self.lost} codes={codes} seconds={self.seconds:.1f}"
            + (f" {self.note}" if self.note else "")
        )

    def lose(self, why: str) -> None:
        self.lost += 1
        if len(self.problems) < 10:
            self.problems.append(why)

    async def call(
        self,
        send: Callable[[], Awaitable[T]],
        *,
        bound: float,
        allowed: Collection[grpc.StatusCode] = (),
        check: Callable[[T], str | None] | None = None,
    ) -> T | None:
        """Send one request and classify its fate; returns the answer when it was OK and correct.

        Args:
            send: makes the call (with its own deadline, shorter than ``bound``).
            bound: seconds after which the request counts as lost (a hang), whatever its deadline.
            allowed: statuses this fault may produce.
            check: a problem with an OK answer (wrong or corrupt), or ``None`` when it is right.
        """
        self.requests += 1
        try:
            async with asyncio.timeout(bound):
                answer = await send()
        except TimeoutError:
            self.lose(f"no answer within {bound:.0f}s")
            return None
        except grpc.aio.AioRpcError as exc:
            return self._failed(exc.code(), exc.details() or "", allowed)
        except LLMOpsError as exc:
            return self._failed(exc.code, exc.message, allowed)
        problem = check(answer) if check is not None else None
        if problem is not None:
            self.lose(f"wrong answer: {problem}")
            return None
        self.ok += 1
        return answer

    def _failed(self, code: grpc.StatusCode, details: str, allowed: Collection[grpc.StatusCode]) -> None:
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        if code in allowed:
            self.allowed += 1
        else:
            self.lose(f"{code.name}: {details[:120]}")

    def assert_nothing_lost(self) -> None:
        assert self.lost == 0, f"{self.line()}; {self.problems}"


#: Every fault recorded in this run, in order.
RECORDED: list[FaultCounts] = []


def record(fault: str) -> FaultCounts:
    """A new tally for ``fault``, printed in the run's summary."""
    counts = FaultCounts(fault)
    RECORDED.append(counts)
    return counts
