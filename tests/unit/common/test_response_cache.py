"""ResponseCache over the fake backend: outcomes, fail open, single flight and metrics.

Invariants: a stored answer comes back whole; non-reproducible requests are never looked up or
stored (bypass); aborted, oversized answers are not stored; TTLs follow the default and the cap; a
failing or slow backend never fails a caller (outcome ERROR, compute runs, errors counted) and is
skipped during the cooldown; identical concurrent misses compute once, and a crashed or failed
holder is replaced; every request is counted exactly once by result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from prometheus_client import CollectorRegistry

from llmops.common.errors import Unavailable
from llmops.common.response_cache import keys
from llmops.common.response_cache.backends.fake import FakeCacheBackend
from llmops.common.response_cache.cache import CacheConfig, ResponseCache
from llmops.common.response_cache.codec import GeneratedOutputCodec
from llmops.common.response_cache.domain import (
    InvalidationScope,
    LookupOutcome,
    Prompt,
    ResolvedModel,
    SamplingParams,
    StoredEntry,
    StoreOutcome,
)
from llmops.common.response_cache.metrics import CacheMetrics
from llmops.proto.common.v1 import generation_pb2, usage_pb2

MODEL = ResolvedModel("tiny", 1, "champion")
KEY = keys.make_key(MODEL, Prompt(text="hi"), SamplingParams(greedy=True))
UNCACHEABLE = keys.make_key(MODEL, Prompt(text="hi"), SamplingParams(temperature=0.9))
CODEC = GeneratedOutputCodec()


def output(
    text: str = "hello", reason: int = generation_pb2.FINISH_REASON_STOP
) -> generation_pb2.GeneratedOutput:
    return generation_pb2.GeneratedOutput(
        completions=[generation_pb2.Completion(index=0, text=text, token_ids=[1, 2], finish_reason=reason)],
        prompt_token_ids=[7],
        usage=usage_pb2.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )


def make(
    config: CacheConfig | None = None, backend: FakeCacheBackend | None = None
) -> tuple[ResponseCache, CollectorRegistry]:
    registry = CollectorRegistry()
    return ResponseCache(backend or FakeCacheBackend(), CacheMetrics(registry), config), registry


def counted(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("llmops_cache_requests_total", {"result": result}) or 0.0


async def test_store_then_lookup_returns_the_whole_answer() -> None:
    cache, registry = make()
    assert (await cache.lookup(KEY)).outcome is LookupOutcome.MISS
    stored = await cache.store(KEY, output().SerializeToString())
    assert stored.outcome is StoreOutcome.STORED and stored.expires_at is not None
    found = await cache.lookup(KEY)
    assert found.outcome is LookupOutcome.HIT and found.entry is not None
    assert CODEC.decode(found.entry.payload) == output()
    assert (counted(registry, "miss"), counted(registry, "hit")) == (1, 1)
    assert registry.get_sample_value("llmops_cache_lookup_seconds_count") == 2


async def test_unreproducible_requests_bypass_the_backend() -> None:
    backend = FakeCacheBackend()
    cache, registry = make(backend=backend)
    assert (await cache.lookup(UNCACHEABLE)).outcome is LookupOutcome.BYPASS
    assert (await cache.store(UNCACHEABLE, b"x")).outcome is StoreOutcome.SKIPPED_NONDETERMINISTIC
    calls = 0

    async def compute() -> generation_pb2.GeneratedOutput:
        nonlocal calls
        calls += 1
        return output()

    for _ in range(2):
        assert (await cache.get_or_compute(UNCACHEABLE, compute, CODEC)).outcome is LookupOutcome.BYPASS
    assert calls == 2 and backend.calls == 0
    assert counted(registry, "bypass") == 3


async def test_incomplete_and_oversized_answers_are_not_stored() -> None:
    cache, _ = make(CacheConfig(max_entry_bytes=1024))
    aborted = output(reason=generation_pb2.FINISH_REASON_ABORT)
    assert (
        await cache.store(KEY, aborted.SerializeToString(), complete=CODEC.complete(aborted))
    ).outcome is (StoreOutcome.SKIPPED_INCOMPLETE)
    assert (await cache.store(KEY, b"x" * 1025)).outcome is StoreOutcome.SKIPPED_TOO_LARGE
    assert (await cache.lookup(KEY)).outcome is LookupOutcome.MISS


@pytest.mark.parametrize(
    ("default", "cap", "asked", "expected_ms"),
    [
        (60, 0, None, 60_000),
        (60, 0, 5, 5_000),
        (60, 0, 0, 0),  # 0: no expiry
        (60, 30, None, 30_000),
        (60, 30, 0, 30_000),  # the cap bounds "no expiry" too
        (60, 30, 10, 10_000),
    ],
)
def test_ttl_default_and_cap(default: float, cap: float, asked: float | None, expected_ms: int) -> None:
    cache, _ = make(CacheConfig(default_ttl=default, max_ttl=cap))
    assert cache.ttl_ms(asked) == expected_ms


async def test_entries_expire_after_their_ttl() -> None:
    now = [1000.0]
    backend = FakeCacheBackend(clock=lambda: now[0])
    cache = ResponseCache(backend, CacheMetrics(CollectorRegistry()), clock=lambda: now[0])
    await cache.store(KEY, b"x", ttl=10)
    now[0] += 9.9
    assert (await cache.lookup(KEY)).outcome is LookupOutcome.HIT
    now[0] += 0.2
    assert (await cache.lookup(KEY)).outcome is LookupOutcome.MISS


async def test_failing_backend_fails_open_and_is_skipped_during_cooldown() -> None:
    backend = FakeCacheBackend()
    cache, registry = make(CacheConfig(failure_cooldown=0.2), backend)
    backend.failing = True
    assert (await cache.lookup(KEY)).outcome is LookupOutcome.ERROR
    assert (await cache.store(KEY, b"x")).outcome is StoreOutcome.ERROR
    calls = backend.calls
    result = await cache.get_or_compute(KEY, lambda: asyncio.sleep(0, output()), CODEC)
    assert result.outcome is LookupOutcome.ERROR and result.value == output()
    assert backend.calls == calls  # skipped: no new attempts during the cooldown
    assert counted(registry, "error") == 2
    stats_errors = (await _stats_counts(cache))["errors"]
    assert stats_errors == 4  # two lookups and two stores (the one after computing was skipped)
    backend.failing = False
    await asyncio.sleep(0.25)
    assert (await cache.lookup(KEY)).outcome is LookupOutcome.MISS  # back after the cooldown


async def _stats_counts(cache: ResponseCache) -> dict[str, int]:
    stats = await cache.stats()
    return {"errors": stats.errors, "hits": stats.hits, "misses": stats.misses}


async def test_slow_backend_times_out_as_an_error() -> None:
    backend = FakeCacheBackend()
    backend.delay = 1.0
    cache, registry = make(CacheConfig(timeout=0.02, failure_cooldown=0), backend)
    started = time.perf_counter()
    assert (await cache.lookup(KEY)).outcome is LookupOutcome.ERROR
    assert time.perf_counter() - started < 0.5
    assert counted(registry, "error") == 1


async def test_invalidate_reports_an_unavailable_backend() -> None:
    backend = FakeCacheBackend()
    cache, _ = make(backend=backend)
    backend.failing = True
    with pytest.raises(Unavailable):
        await cache.invalidate(InvalidationScope("tiny"))
    assert (await cache.stats()).errors == 0  # the counters still answer


async def test_twenty_concurrent_identical_misses_compute_once() -> None:
    cache, registry = make(CacheConfig(poll_interval=0.005))
    calls = 0

    async def compute() -> generation_pb2.GeneratedOutput:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return output("once")

    results = await asyncio.gather(*(cache.get_or_compute(KEY, compute, CODEC) for _ in range(20)))
    assert calls == 1
    assert all(r.value == output("once") for r in results)
    assert sorted(r.outcome.value for r in results) == ["hit"] * 19 + ["miss"]
    assert (counted(registry, "hit"), counted(registry, "miss")) == (19, 1)


async def test_a_waiter_takes_over_when_the_holder_fails() -> None:
    cache, _ = make(CacheConfig(poll_interval=0.005))
    calls = 0

    async def compute() -> generation_pb2.GeneratedOutput:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        if calls == 1:
            raise RuntimeError("engine crashed")
        return output("second")

    first, second = await asyncio.gather(
        cache.get_or_compute(KEY, compute, CODEC),
        cache.get_or_compute(KEY, compute, CODEC),
        return_exceptions=True,
    )
    assert isinstance(first, RuntimeError)
    assert not isinstance(second, BaseException) and second.value == output("second")
    assert calls == 2


async def test_a_waiter_takes_over_when_the_holder_dies() -> None:
    backend = FakeCacheBackend()
    cache, _ = make(CacheConfig(lock_ttl=0.1, poll_interval=0.005), backend)
    assert await backend.try_lock(KEY.digest, "dead-holder", 100)  # a process that took the lock, then died
    started = time.perf_counter()
    result = await cache.get_or_compute(KEY, lambda: asyncio.sleep(0, output("mine")), CODEC)
    assert result.outcome is LookupOutcome.MISS and result.value == output("mine")
    assert 0.08 < time.perf_counter() - started < 1.0


async def test_a_long_computation_keeps_its_lock() -> None:
    backend = FakeCacheBackend()
    cache, _ = make(CacheConfig(lock_ttl=0.06, poll_interval=0.005), backend)
    calls = 0

    async def compute() -> generation_pb2.GeneratedOutput:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)  # five lock lifetimes: the holder renews it
        return output()

    leader = asyncio.ensure_future(cache.get_or_compute(KEY, compute, CODEC))
    await asyncio.sleep(0.02)
    follower = await cache.get_or_compute(KEY, compute, CODEC)
    assert (await leader).outcome is LookupOutcome.MISS and follower.outcome is LookupOutcome.HIT
    assert calls == 1


async def test_a_waiter_stops_waiting_after_the_limit() -> None:
    backend = FakeCacheBackend()
    cache, _ = make(CacheConfig(single_flight_wait=0.05, lock_ttl=10, poll_interval=0.005), backend)
    assert await backend.try_lock(KEY.digest, "slow-holder", 10_000)
    result = await cache.get_or_compute(KEY, lambda: asyncio.sleep(0, output()), CODEC)
    assert result.outcome is LookupOutcome.MISS


async def test_a_waiter_with_a_deadline_waits_a_share_of_it_then_computes() -> None:
    backend = FakeCacheBackend()
    cache, _ = make(
        CacheConfig(single_flight_wait=60, single_flight_wait_share=0.25, poll_interval=0.005), backend
    )
    assert cache.wait_limit(None) == 60 and cache.wait_limit(2.0) == 0.5 and cache.wait_limit(-1) == 0
    assert cache.wait_limit(1000) == 60
    assert await backend.try_lock(KEY.digest, "slow-holder", 60_000)  # never answers
    # the caller's own deadline (0.4 s) bounds the wait, not single_flight_wait (60 s)
    result = await asyncio.wait_for(
        cache.get_or_compute(KEY, lambda: asyncio.sleep(0, output("own")), CODEC, timeout=0.4), 0.4
    )
    assert result.outcome is LookupOutcome.MISS and result.value == output("own")


async def test_lock_scopes_share_entries_but_not_locks() -> None:
    backend = FakeCacheBackend()
    cache, _ = make(CacheConfig(single_flight_wait=60, poll_interval=0.005), backend)
    # the front tier's leader holds its lock while the tier behind computes the same key
    async with cache.flight(KEY, CODEC, lock_scope="router") as front:
        assert not front.hit
        behind = await asyncio.wait_for(
            cache.get_or_compute(KEY, lambda: asyncio.sleep(0, output("behind")), CODEC), 5
        )
        assert behind.outcome is LookupOutcome.MISS
        await front.store(behind.value)
    hit = await cache.get_or_compute(
        KEY, lambda: asyncio.sleep(0, output("again")), CODEC, lock_scope="router"
    )
    assert hit.outcome is LookupOutcome.HIT and hit.value == output("behind")


async def test_an_undecodable_entry_is_an_error_not_a_failure() -> None:
    cache, registry = make()
    await cache.store(KEY, b"\xff\xff not a proto")
    result = await cache.get_or_compute(KEY, lambda: asyncio.sleep(0, output()), CODEC)
    assert result.outcome is LookupOutcome.ERROR and result.value == output()
    assert counted(registry, "error") == 1


async def test_invalidate_and_stats_count() -> None:
    cache, registry = make()
    await cache.store(KEY, b"x")
    assert (await cache.invalidate(InvalidationScope("tiny", alias="champion"))) == 1
    stats = await cache.stats()
    assert (stats.stores, stats.invalidated, stats.entries) == (1, 1, 0)
    assert registry.get_sample_value("llmops_cache_invalidations_total") == 1
    assert registry.get_sample_value("llmops_cache_entries") == 0


class SwallowingBackend(FakeCacheBackend):
    """Completes a call even when its task is cancelled meanwhile, as redis-py's asyncio client may."""

    async def get(self, key: keys.CacheKey) -> StoredEntry | None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, like redis/redis-py#2028
            await asyncio.sleep(0.05)
        return None


async def test_a_cancellation_swallowed_by_the_client_still_cancels_the_caller() -> None:
    cache, _ = make(CacheConfig(timeout=1.0), SwallowingBackend())
    computed = False

    async def compute() -> generation_pb2.GeneratedOutput:
        nonlocal computed
        computed = True
        return output()

    request = asyncio.ensure_future(cache.get_or_compute(KEY, compute, CODEC))
    await asyncio.sleep(0.01)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert not computed  # the caller's client went away: no engine work
