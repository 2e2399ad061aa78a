"""The load signal routers read: ``WatchLoad`` reports of queued and running requests per model.

Design: the server samples its own counters (the admission queue's ``waiting`` and ``running``,
the engine's KV-cache usage where it tells) every ``min_interval`` seconds and sends a report only
when something changed, or after ``heartbeat`` seconds of quiet, so a silent stream means a stuck
server. Sampling is a walk over a handful of models (microseconds); an idle replica costs one small
message per heartbeat per watching router, a busy one at most one per ``min_interval``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llmops.serving.domain import ModelState, ResolvedModel
from llmops.serving.models import ServedModel

DEFAULT_MIN_INTERVAL_SECONDS = 0.02
DEFAULT_HEARTBEAT_SECONDS = 0.25


@dataclass(frozen=True)
class ModelLoad:
    """One served model's load now."""

    served_name: str
    model: ResolvedModel | None
    state: ModelState
    waiting: int
    running: int
    capacity: int
    kv_cache_usage: float


def model_load(entry: ServedModel) -> ModelLoad:
    """The load of one entry of the model table."""
    admission = entry.admission
    stats = entry.engine.stats() if entry.engine is not None and entry.state is ModelState.READY else None
    return ModelLoad(
        served_name=entry.served_name,
        model=entry.info.model,
        state=entry.state,
        waiting=admission.waiting if admission is not None else 0,
        running=admission.running if admission is not None else 0,
        capacity=admission.capacity if admission is not None else 0,
        kv_cache_usage=round(stats.kv_cache_usage, 3) if stats is not None else 0.0,
    )


async def watch_load(
    loads: Callable[[], list[ModelLoad]], min_interval: float, heartbeat: float
) -> AsyncIterator[list[ModelLoad]]:
    """Reports: one at once, then one per change (at most one per ``min_interval``) or heartbeat."""
    last: list[ModelLoad] | None = None
    sent = 0.0
    while True:
        now = loads()
        at = time.monotonic()
        if now != last or at - sent >= heartbeat:
            yield now
            last, sent = now, at
        await asyncio.sleep(min_interval)
