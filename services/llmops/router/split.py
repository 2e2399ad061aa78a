"""Traffic split by registry alias: the registry's weights (champion 90, challenger 10) pick an
alias per request, sticky per session, and the request goes to replicas serving that alias's version.

Weights are read with :meth:`RegistryClient.get_alias_weights` the first time a model is routed and
refreshed in the background every ``refresh_seconds``, never on the hot path after the first. A
session's draw is a fixed point in [0, 1) from a stable hash of its id laid over the aliases'
cumulative shares (sorted by alias), so a session keeps its alias while the weights stand and only
the sessions in the moved share change side when they move. Requests without a session draw at
random. No weights, no registry, or no replica of the drawn version: no split (every candidate).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from llmops.common.clients import TrafficSplit
from llmops.common.errors import LLMOpsError, NotFound

log = logging.getLogger(__name__)

Fetch = Callable[[str], Awaitable[TrafficSplit]]


def session_point(session: str) -> float:
    """A stable point in [0, 1) for a session id (the same on every router replica)."""
    return int.from_bytes(hashlib.blake2b(session.encode(), digest_size=8).digest(), "big") / 2**64


def draw(weights: dict[str, int], point: float) -> str:
    """The alias whose cumulative share contains ``point`` (``weights`` all > 0, not empty)."""
    total = sum(weights.values())
    reached = 0.0
    aliases = sorted(weights)
    for alias in aliases:
        reached += weights[alias] / total
        if point < reached:
            return alias
    return aliases[-1]


class AliasSplitter:
    """Cached weights per model name, and the draw."""

    def __init__(self, fetch: Fetch, refresh_seconds: float, *, seed: int | None = None) -> None:
        self._fetch = fetch
        self._refresh = refresh_seconds
        self._splits: dict[str, tuple[float, TrafficSplit | None]] = {}
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._random = random.Random(seed)

    async def split(self, model_name: str) -> TrafficSplit | None:
        entry = self._splits.get(model_name)
        if entry is None:
            await self._load(model_name)
            entry = self._splits.get(model_name, (0.0, None))
        elif time.monotonic() - entry[0] > self._refresh and model_name not in self._pending:
            self._pending[model_name] = asyncio.create_task(self._load(model_name))
        return entry[1]

    async def _load(self, model_name: str) -> None:
        try:
            split: TrafficSplit | None = await self._fetch(model_name)
        except NotFound:
            split = None  # not a registry model: never split
        except LLMOpsError as exc:  # registry away: keep what we had, try again at the next refresh
            log.warning("alias weights of %s unavailable: %s", model_name, exc.message)
            split = self._splits.get(model_name, (0.0, None))[1]
        finally:
            self._pending.pop(model_name, None)
        self._splits[model_name] = (time.monotonic(), split)

    def choose(self, split: TrafficSplit, session: str) -> tuple[str, int] | None:
        """(alias, version) for one request, or ``None`` when the split routes nothing."""
        weights = split.routable()
        if not weights:
            return None
        alias = draw(weights, session_point(session) if session else self._random.random())
        return alias, split.versions[alias]

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
