"""An in-memory backend with the Redis backend's behaviour, a clock of the test's choosing, and
switches that make it fail or stall (for fail-open tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmops.common.response_cache.backends.base import (
    CacheBackend,
    CacheBackendError,
    decode_entry,
    encode_entry,
)
from llmops.common.response_cache.domain import (
    BackendSizes,
    CacheKey,
    InvalidationScope,
    ResolvedModel,
    StoredEntry,
)


@dataclass
class _Entry:
    data: bytes
    expires_at: float | None
    key: CacheKey
    aliases: set[tuple[str, str]] = field(default_factory=set)  # (model name, alias) it was stored under


class FakeCacheBackend(CacheBackend):
    """Entries in a dict, keyed by digest.

    Attributes:
        failing: every call raises :class:`CacheBackendError` while true.
        delay: seconds every call sleeps first (a slow backend).
        calls: how many calls were made, failing ones included.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self.failing = False
        self.delay = 0.0
        self.calls = 0

    async def _enter(self) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failing:
            raise CacheBackendError("fake backend is down")

    def _live(self, digest: str) -> _Entry | None:
        entry = self._entries.get(digest)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self._clock():
            del self._entries[digest]
            return None
        return entry

    async def get(self, key: CacheKey) -> StoredEntry | None:
        await self._enter()
        entry = self._live(key.digest)
        return None if entry is None else decode_entry(entry.data)

    async def put(self, key: CacheKey, payload: bytes, *, stored_at_ms: int, ttl_ms: int) -> None:
        await self._enter()
        expires_ms = stored_at_ms + ttl_ms if ttl_ms else 0
        previous = self._live(key.digest)
        entry = _Entry(
            encode_entry(payload, stored_at_ms, expires_ms),
            self._clock() + ttl_ms / 1000 if ttl_ms else None,
            key,
            set(previous.aliases) if previous else set(),
        )
        for model in (key.model, key.adapter):
            if model is not None and model.alias:
                entry.aliases.add((model.name, model.alias))
        self._entries[key.digest] = entry

    @staticmethod
    def _matches(entry: _Entry, scope: InvalidationScope) -> bool:
        if scope.tenant is not None and entry.key.tenant != scope.tenant:
            return False
        if scope.alias is not None:
            return (scope.model_name, scope.alias) in entry.aliases

        def same(model: ResolvedModel | None) -> bool:
            return (
                model is not None
                and model.name == scope.model_name
                and (scope.version is None or model.version == scope.version)
            )

        return same(entry.key.model) or same(entry.key.adapter)

    async def invalidate(self, scope: InvalidationScope) -> int:
        await self._enter()
        doomed = [d for d in list(self._entries) if self._live(d) and self._matches(self._entries[d], scope)]
        for digest in doomed:
            del self._entries[digest]
        return len(doomed)

    def _lock_holder(self, name: str) -> str | None:
        held = self._locks.get(name)
        if held is None or held[1] <= self._clock():
            self._locks.pop(name, None)
            return None
        return held[0]

    async def try_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        await self._enter()
        if self._lock_holder(name) is not None:
            return False
        self._locks[name] = (token, self._clock() + ttl_ms / 1000)
        return True

    async def extend_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        await self._enter()
        if self._lock_holder(name) != token:
            return False
        self._locks[name] = (token, self._clock() + ttl_ms / 1000)
        return True

    async def release_lock(self, name: str, token: str) -> None:
        await self._enter()
        if self._lock_holder(name) == token:
            del self._locks[name]

    async def sizes(self) -> BackendSizes:
        await self._enter()
        live = [e for d in list(self._entries) if (e := self._live(d)) is not None]
        return BackendSizes(len(live), sum(len(e.data) + len(e.key.digest) for e in live))

    async def ping(self) -> bool:
        try:
            await self._enter()
        except CacheBackendError:
            return False
        return True
