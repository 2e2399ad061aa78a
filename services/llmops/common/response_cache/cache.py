"""The response cache: lookups, stores and single flight over a backend, failing open everywhere.

:class:`ResponseCache` is what both the cache's gRPC service and serving (in process, straight to
Redis) use. Guarantees:

* Fail open: a backend that is down, slow (past ``timeout``) or returns garbage makes a lookup a
  miss (outcome ERROR, counted), a store a no-op (counted), and :meth:`ResponseCache.get_or_compute`
  simply computes. No cache failure ever reaches the caller of a lookup, store or flight. After a
  failure the backend is skipped for ``failure_cooldown`` (calls are instant misses), so a dead Redis
  costs one timeout per cooldown, not one per request.
* Single flight: identical cacheable requests that miss at the same time, in any process, compute
  once. The first takes a short lock (``SET NX PX``) and renews it while it computes; the others poll
  for its answer and, when the lock is gone without an answer (the holder died, failed or could not
  store), the first of them to take the lock computes. A waiter gives up and computes itself after
  ``single_flight_wait``, or sooner when the caller passes its remaining time (``timeout``): after
  ``single_flight_wait_share`` of it. So a slow leader (its replica draining or reloading, its
  request held by the router) delays an identical request by at most that share of its deadline,
  never past it; with generous deadlines every waiter still gets the leader's answer.
* Tiers: a cache in front (the router's) and one behind it (serving's) share entries but take
  locks under different scopes (``lock_scope``): the router's leader forwards to serving, whose own
  flight must not wait on the router's lock, which would be waiting on serving itself.
* Every backend call (lookup, lock, renew, release, store) is bounded by ``timeout``
  (``redis_timeout_ms``: an asyncio timeout here, the Redis client's socket timeouts below it).
* Only reproducible requests (see :func:`llmops.common.response_cache.keys.is_cacheable`) are looked up or stored;
  the rest are counted as bypass.

:meth:`invalidate` does not fail open: a failure there is :class:`~llmops.common.errors.Unavailable`,
since its caller must know it did not happen. :meth:`stats` answers from this process's counters
even while the backend is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

from llmops.common.errors import Unavailable
from llmops.common.response_cache.backends.base import CacheBackend, CacheBackendError, from_ms
from llmops.common.response_cache.domain import (
    CacheKey,
    CacheStats,
    InvalidationScope,
    LookupOutcome,
    LookupResult,
    StoredEntry,
    StoreOutcome,
    StoreResult,
)
from llmops.common.response_cache.metrics import CacheMetrics
from llmops.common.settings import CacheSection

log = logging.getLogger(__name__)
T = TypeVar("T")
V = TypeVar("V")


class PayloadCodec(Protocol[V]):
    """Turns a caller's answer into the stored payload (a serialized ``GeneratedOutput``) and back."""

    def encode(self, value: V) -> bytes: ...
    def decode(self, data: bytes) -> V: ...
    def complete(self, value: V) -> bool:
        """False for answers that must not be stored (a completion ended with ABORT)."""
        ...


@dataclass(frozen=True)
class CacheConfig:
    """The cache's knobs, in seconds; see ``CacheSection`` for their meaning."""

    default_ttl: float = 3600.0
    max_ttl: float = 0.0
    max_entry_bytes: int = 4 * 1024 * 1024
    timeout: float = 0.05
    failure_cooldown: float = 1.0
    lock_ttl: float = 2.0
    single_flight_wait: float = 60.0
    single_flight_wait_share: float = 0.25
    poll_interval: float = 0.02

    @classmethod
    def from_settings(cls, section: CacheSection) -> CacheConfig:
        return cls(
            default_ttl=section.default_ttl_seconds,
            max_ttl=section.max_ttl_seconds,
            max_entry_bytes=section.max_entry_bytes,
            timeout=section.redis_timeout_ms / 1000,
            failure_cooldown=section.failure_cooldown_ms / 1000,
            lock_ttl=section.single_flight_lock_ms / 1000,
            single_flight_wait=section.single_flight_wait_ms / 1000,
            single_flight_wait_share=section.single_flight_wait_share,
            poll_interval=section.single_flight_poll_ms / 1000,
        )


@dataclass(frozen=True)
class Cached(Generic[V]):
    """An answer and where it came from: HIT (the cache), MISS / ERROR / BYPASS (computed here)."""

    value: V
    outcome: LookupOutcome
    stored_at: datetime | None = None


class Flight(Generic[V]):
    """One request's pass through the cache, from :meth:`ResponseCache.flight`.

    On a hit ``value`` is the stored answer (possibly one another process just computed). Otherwise
    the caller computes and hands the answer to :meth:`store`; while it does, identical requests
    wait for that answer instead of computing their own.
    """

    def __init__(
        self, cache: ResponseCache, key: CacheKey, codec: PayloadCodec[V], lock_name: str = ""
    ) -> None:
        self._cache = cache
        self.key = key
        self._lock_name = lock_name or key.digest
        self._codec = codec
        self.outcome = LookupOutcome.BYPASS
        self.value: V | None = None
        self.entry: StoredEntry | None = None
        self.stored: StoreResult | None = None
        self._lock_token: str | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._stop_renewing = asyncio.Event()

    @property
    def hit(self) -> bool:
        return self.outcome is LookupOutcome.HIT

    async def store(self, value: V, *, ttl: float | None = None) -> StoreResult:
        """Store the computed answer (never raises); after a hit or a bypass nothing is stored
        (outcome SKIPPED_NONDETERMINISTIC)."""
        if self.hit or not self.key.cacheable:
            self.stored = StoreResult(StoreOutcome.SKIPPED_NONDETERMINISTIC, self.key.digest)
            return self.stored
        complete = True
        try:
            payload = self._codec.encode(value)
            complete = self._codec.complete(value)
        except Exception:
            log.warning("cannot encode an answer for the cache; not stored", exc_info=True)
            self.stored = StoreResult(StoreOutcome.ERROR, self.key.digest)
            return self.stored
        self.stored = await self._cache.store(self.key, payload, ttl=ttl, complete=complete)
        return self.stored


class ResponseCache:
    """Lookups, stores, single flight and invalidation over a :class:`CacheBackend`."""

    def __init__(
        self,
        backend: CacheBackend,
        metrics: CacheMetrics,
        config: CacheConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.config = config or CacheConfig()
        self._clock = clock
        self._skip_until = 0.0  # monotonic time until which the backend is skipped after a failure
        self.since = datetime.fromtimestamp(clock(), tz=UTC)
        self._sizes = (0, 0)  # entries, bytes: the last count
        self._counts = dict.fromkeys(("hits", "misses", "bypasses", "errors", "stores", "invalidated"), 0)

    # --- backend calls that fail open --------------------------------------------------------------

    async def _guarded(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run a backend call within the timeout; any failure is :class:`CacheBackendError`.

        redis-py's asyncio client can swallow a cancellation that lands mid-command (the command
        then completes; redis/redis-py#2028): the cancellation is re-raised here, so a caller whose
        client went away stops instead of going on to compute.
        """
        if time.monotonic() < self._skip_until:
            raise CacheBackendError("backend skipped after a recent failure")
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.config.timeout):
                result = await call()
        except CacheBackendError as exc:
            self._raise_swallowed_cancel(task, cancels)
            self._failed(what, exc)
            raise
        except TimeoutError as exc:
            self._raise_swallowed_cancel(task, cancels)
            self._failed(what, exc)
            raise CacheBackendError(f"{what} took longer than {self.config.timeout * 1000:.0f} ms") from exc
        except Exception as exc:  # a bug or an unexpected client error: still never the caller's problem
            self._raise_swallowed_cancel(task, cancels)
            self._failed(what, exc)
            raise CacheBackendError(f"{what} failed: {type(exc).__name__}") from exc
        self._raise_swallowed_cancel(task, cancels)
        return result

    @staticmethod
    def _raise_swallowed_cancel(task: asyncio.Task[object] | None, cancels: int) -> None:
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError()

    def _failed(self, what: str, exc: BaseException) -> None:
        if self.config.failure_cooldown and time.monotonic() >= self._skip_until:
            log.warning(
                "cache backend %s failed (%s); serving without the cache for %.1fs",
                what, exc, self.config.failure_cooldown,
            )  # fmt: skip
        self._skip_until = time.monotonic() + self.config.failure_cooldown

    def _error(self) -> None:
        self._counts["errors"] += 1

    # --- lookup and store --------------------------------------------------------------------------

    async def _get(self, key: CacheKey) -> tuple[LookupOutcome, StoredEntry | None]:
        started = time.perf_counter()
        try:
            entry = await self._guarded("lookup", lambda: self.backend.get(key))
        except CacheBackendError:
            return LookupOutcome.ERROR, None
        finally:
            self.metrics.lookup_seconds.observe(time.perf_counter() - started)
        return (LookupOutcome.HIT, entry) if entry is not None else (LookupOutcome.MISS, None)

    def _count(self, outcome: LookupOutcome) -> None:
        self.metrics.count(outcome)
        field = {
            LookupOutcome.HIT: "hits",
            LookupOutcome.MISS: "misses",
            LookupOutcome.BYPASS: "bypasses",
            LookupOutcome.ERROR: "errors",
        }[outcome]
        self._counts[field] += 1

    async def lookup(self, key: CacheKey) -> LookupResult:
        """The stored answer for ``key``, if any; never raises."""
        if not key.cacheable:
            self._count(LookupOutcome.BYPASS)
            return LookupResult(LookupOutcome.BYPASS, "")
        outcome, entry = await self._get(key)
        self._count(outcome)
        return LookupResult(outcome, key.digest, entry)

    def ttl_ms(self, ttl: float | None) -> int:
        """The lifetime a store gets in ms (0: none): the default when unset, capped at the maximum."""
        seconds = self.config.default_ttl if ttl is None else ttl
        if self.config.max_ttl and (seconds == 0 or seconds > self.config.max_ttl):
            seconds = self.config.max_ttl
        return max(0, round(seconds * 1000))

    async def store(
        self, key: CacheKey, payload: bytes, *, ttl: float | None = None, complete: bool = True
    ) -> StoreResult:
        """Store ``payload`` (a serialized ``GeneratedOutput``) under ``key``; never raises.

        Args:
            ttl: seconds to keep it; ``None`` the default, 0 no expiry (both capped at the maximum).
            complete: false when the answer was cut short (ABORT): it is not stored.
        """
        if not key.cacheable:
            return StoreResult(StoreOutcome.SKIPPED_NONDETERMINISTIC, "")
        if not complete:
            return StoreResult(StoreOutcome.SKIPPED_INCOMPLETE, key.digest)
        if len(payload) > self.config.max_entry_bytes:
            return StoreResult(StoreOutcome.SKIPPED_TOO_LARGE, key.digest)
        ttl_ms = self.ttl_ms(ttl)
        stored_at_ms = int(self._clock() * 1000)
        try:
            await self._guarded(
                "store", lambda: self.backend.put(key, payload, stored_at_ms=stored_at_ms, ttl_ms=ttl_ms)
            )
        except CacheBackendError:
            self._error()
            return StoreResult(StoreOutcome.ERROR, key.digest)
        self._counts["stores"] += 1
        return StoreResult(
            StoreOutcome.STORED, key.digest, from_ms(stored_at_ms + ttl_ms) if ttl_ms else None
        )

    # --- single flight -----------------------------------------------------------------------------

    def wait_limit(self, timeout: float | None) -> float:
        """How long a request with ``timeout`` seconds left (``None``: no deadline) waits for an
        identical request's answer before computing its own."""
        limit = self.config.single_flight_wait
        if timeout is not None:
            limit = min(limit, max(0.0, timeout) * self.config.single_flight_wait_share)
        return limit

    @contextlib.asynccontextmanager
    async def flight(
        self,
        key: CacheKey,
        codec: PayloadCodec[V],
        *,
        timeout: float | None = None,
        lock_scope: str = "",
    ) -> AsyncIterator[Flight[V]]:
        """Look ``key`` up; on a miss, hold its single-flight lock while the caller computes.

        Args:
            timeout: seconds the caller has left (its gRPC deadline); a waiter computes itself after
                ``single_flight_wait_share`` of it (see :meth:`wait_limit`). ``None``: no deadline.
            lock_scope: the tier taking the lock (``"router"`` in front of serving; ``""`` serving
                and the cache service): tiers share entries but never wait on each other's lock.

        Usage (a streaming caller replays ``flight.value`` on a hit, else streams and stores)::

            async with cache.flight(key, codec) as flight:
                if flight.hit:
                    return flight.value
                answer = await compute()
                await flight.store(answer)
                return answer

        Counts the request once (hit, miss, error or bypass) and never raises on its own.
        """
        current: Flight[V] = Flight(self, key, codec, f"{lock_scope}:{key.digest}" if lock_scope else "")
        try:
            if key.cacheable:
                await self._enter(current, self.wait_limit(timeout))
            self._count(current.outcome)
            yield current
        finally:
            await self._leave(current)

    async def _enter(self, flight: Flight[V], wait: float) -> None:
        outcome, entry = await self._get(flight.key)
        if outcome is LookupOutcome.MISS:
            outcome, entry = await self._wait_or_lead(flight, wait)
        flight.outcome = outcome
        if entry is not None:
            try:
                flight.value = flight._codec.decode(entry.payload)
                flight.entry = entry
            except Exception:
                log.warning(
                    "undecodable cache entry %s; treating it as a miss", flight.key.digest, exc_info=True
                )
                flight.outcome = LookupOutcome.ERROR

    async def _wait_or_lead(self, flight: Flight[V], wait: float) -> tuple[LookupOutcome, StoredEntry | None]:
        """After a miss: lead (take the lock, compute) or wait up to ``wait`` s for the leader's answer."""
        key, name = flight.key, flight._lock_name
        token = os.urandom(8).hex()
        lock_ms = max(1, round(self.config.lock_ttl * 1000))
        deadline = time.monotonic() + wait
        pause = min(0.002, self.config.poll_interval)
        try:
            while True:
                if await self._guarded("lock", lambda: self.backend.try_lock(name, token, lock_ms)):
                    flight._lock_token = token
                    flight._heartbeat = asyncio.create_task(
                        self._renew(name, token, lock_ms, flight._stop_renewing)
                    )
                    # The previous holder may have stored and released between our lookup and the lock.
                    entry = await self._guarded("lookup", lambda: self.backend.get(key))
                    return (LookupOutcome.HIT, entry) if entry is not None else (LookupOutcome.MISS, None)
                left = deadline - time.monotonic()
                if left <= 0:
                    log.debug("gave up waiting for %s's leader after %.3fs", key.digest, wait)
                    return LookupOutcome.MISS, None  # compute without the lock
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, self.config.poll_interval)
                entry = await self._guarded("lookup", lambda: self.backend.get(key))
                if entry is not None:
                    return LookupOutcome.HIT, entry
        except CacheBackendError:
            return LookupOutcome.ERROR, None

    async def _renew(self, name: str, token: str, lock_ms: int, stop: asyncio.Event) -> None:
        """Keep the lock while the holder computes, so only a dead holder's lock runs out.

        Stopped by ``stop``, never cancelled: a cancellation that lands inside redis-py's I/O can be
        swallowed there, and the lock would then be renewed forever.
        """
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), lock_ms / 3000)
            if stop.is_set():
                return
            try:
                if not await self._guarded(
                    "extend lock", lambda: self.backend.extend_lock(name, token, lock_ms)
                ):
                    return
            except CacheBackendError:
                continue

    async def _leave(self, flight: Flight[V]) -> None:
        flight._stop_renewing.set()  # before any await: a cancelled caller still stops the renewals
        if flight._heartbeat is not None:
            await asyncio.shield(flight._heartbeat)
        token, flight._lock_token = flight._lock_token, None
        if token is not None:
            with contextlib.suppress(CacheBackendError):
                await self._guarded(
                    "release lock", lambda: self.backend.release_lock(flight._lock_name, token)
                )

    async def get_or_compute(
        self,
        key: CacheKey,
        compute: Callable[[], Awaitable[V]],
        codec: PayloadCodec[V],
        *,
        ttl: float | None = None,
        timeout: float | None = None,
        lock_scope: str = "",
    ) -> Cached[V]:
        """The cached answer for ``key``, or ``compute()``'s (stored for next time) with single flight.

        ``timeout`` and ``lock_scope`` are :meth:`flight`'s. Exceptions from ``compute`` propagate
        (nothing is stored); cache failures never do.
        """
        async with self.flight(key, codec, timeout=timeout, lock_scope=lock_scope) as flight:
            if flight.hit:
                assert flight.value is not None
                return Cached(
                    flight.value, LookupOutcome.HIT, flight.entry.stored_at if flight.entry else None
                )
            value = await compute()
            await flight.store(value, ttl=ttl)
            return Cached(value, flight.outcome)

    # --- admin -------------------------------------------------------------------------------------

    async def invalidate(self, scope: InvalidationScope) -> int:
        """Remove the entries ``scope`` matches; how many were removed.

        Raises:
            Unavailable: the backend failed (nothing is known to be removed).
        """
        try:
            removed = await self.backend.invalidate(scope)
        except CacheBackendError as exc:
            raise Unavailable(f"cache backend unavailable: {exc}") from exc
        self._counts["invalidated"] += removed
        self.metrics.invalidations.inc(removed)
        return removed

    async def refresh_sizes(self) -> tuple[int, int]:
        """Recount the backend's entries and bytes and publish them on the gauges.

        Raises:
            Unavailable: the backend failed.
        """
        try:
            sizes = await self.backend.sizes()
        except CacheBackendError as exc:
            raise Unavailable(f"cache backend unavailable: {exc}") from exc
        self.metrics.entries.set(sizes.entries)
        self.metrics.bytes.set(sizes.bytes)
        self._sizes = (sizes.entries, sizes.bytes)
        return self._sizes

    async def stats(self) -> CacheStats:
        """This process's counters since it started and the backend's sizes now.

        Never raises: with the backend down (when the counters matter most) the sizes are the last
        ones counted, and ``errors`` says why.
        """
        try:
            await self.refresh_sizes()
        except Unavailable as exc:
            log.warning("cannot count the cache's entries: %s", exc.message)
        return CacheStats(
            **self._counts,
            entries=self._sizes[0],
            bytes=self._sizes[1],
            since=self.since,
        )

    async def ping(self) -> bool:
        """Whether the backend answers (readiness); never raises."""
        return await self.backend.ping()
