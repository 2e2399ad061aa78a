"""Fail open against a real Redis that is stopped in the middle of a run and started again.

Invariants: while Redis is down every request still gets its answer (computed), none sees an error,
``llmops_cache_requests_total{result="error"}`` rises and the service turns NOT_SERVING; each outage
costs at most one timeout per cooldown, not one per request; a Redis that stalls (CLIENT PAUSE) makes
lookups errors within the configured timeout; once Redis is back, caching resumes by itself (misses
are stored, then hit) and the service is SERVING again, its lookups and stores OK throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from llmops.cache.redis_server import RedisServer
from llmops.common.response_cache import keys
from llmops.common.response_cache.build import build_response_cache, start_backend
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.response_cache.codec import GeneratedOutputCodec
from llmops.common.response_cache.domain import LookupOutcome, Prompt, ResolvedModel, SamplingParams
from llmops.common.settings import Settings
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import generation_pb2
from tests.integration.cache.conftest import start_cache, unique_model

CODEC = GeneratedOutputCodec()


def answer(text: str) -> generation_pb2.GeneratedOutput:
    return generation_pb2.GeneratedOutput(
        completions=[generation_pb2.Completion(text=text, finish_reason=generation_pb2.FINISH_REASON_STOP)]
    )


def in_process_cache(url: str, registry: CollectorRegistry, **cache: str) -> ResponseCache:
    env = {"LLMOPS_REDIS_URL": url, **{f"LLMOPS_CACHE_{k.upper()}": v for k, v in cache.items()}}
    return build_response_cache(Settings.load(env=env), registry)


async def eventually(check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_requests_succeed_while_redis_is_down_and_caching_resumes(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    redis = make_redis_server()
    registry = CollectorRegistry()
    cache = in_process_cache(redis.url, registry, redis_timeout_ms="200", failure_cooldown_ms="200")
    assert await start_backend(cache)
    key = keys.make_key(ResolvedModel(unique_model(), 1), Prompt(text="q"), SamplingParams(greedy=True))
    computed = 0

    async def engine() -> generation_pb2.GeneratedOutput:
        nonlocal computed
        computed += 1
        return answer("42")

    async def request() -> LookupOutcome:
        result = await cache.get_or_compute(key, engine, CODEC)
        assert result.value == answer("42")  # every request is answered, whatever the cache does
        return result.outcome

    def errors() -> float:
        return registry.get_sample_value("llmops_cache_requests_total", {"result": "error"}) or 0.0

    assert [await request(), await request()] == [LookupOutcome.MISS, LookupOutcome.HIT]
    assert computed == 1

    redis.stop()  # in the middle of the run
    outcomes = []
    started = time.perf_counter()
    for _ in range(20):
        outcomes.append(await request())
    elapsed = time.perf_counter() - started
    assert set(outcomes) == {LookupOutcome.ERROR}
    assert computed == 21 and errors() == 20
    assert elapsed < 2.0, f"20 requests during an outage took {elapsed:.2f}s"  # the cooldown spares timeouts

    redis.start()
    await eventually(lambda: cache.ping())
    await asyncio.sleep(0.25)  # let the cooldown pass
    assert await request() is LookupOutcome.MISS  # Redis lost its data (no persistence): computed, stored
    assert await request() is LookupOutcome.HIT
    assert computed == 22
    await cache.backend.close()


async def test_a_stalled_redis_is_an_error_within_the_timeout(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    redis = make_redis_server()
    registry = CollectorRegistry()
    cache = in_process_cache(redis.url, registry, redis_timeout_ms="50", failure_cooldown_ms="0")
    await start_backend(cache)
    key = keys.make_key(ResolvedModel(unique_model(), 1), Prompt(text="q"), SamplingParams(greedy=True))
    assert (await cache.lookup(key)).outcome is LookupOutcome.MISS  # connection warm
    async with aioredis.Redis.from_url(redis.url) as admin:
        assert await admin.client_pause(500)  # Redis stops answering everyone else for 500 ms
        started = time.perf_counter()
        assert (await cache.lookup(key)).outcome is LookupOutcome.ERROR
        assert time.perf_counter() - started < 0.3
        await admin.client_unpause()
    await eventually(lambda: _outcome_is(cache, key, LookupOutcome.MISS))
    await cache.backend.close()


async def _outcome_is(cache: ResponseCache, key: keys.CacheKey, outcome: LookupOutcome) -> bool:
    return (await cache.lookup(key)).outcome is outcome


async def test_the_service_answers_ok_while_redis_is_down(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    redis = make_redis_server()
    running = await start_cache(redis.url, redis_timeout_ms=200, failure_cooldown_ms=100)
    client = running.client
    k = pb.CacheKey(
        model={"name": unique_model(), "version": 1},
        prompt=generation_pb2.Prompt(text="q"),
        sampling={"greedy": True},
    )
    try:
        redis.stop()
        looked = await client.unary(client.stub.Lookup, pb.LookupRequest(key=k))
        assert looked.outcome == pb.CACHE_OUTCOME_ERROR and looked.digest.startswith("v1:")
        stored = await client.unary(client.stub.Store, pb.StoreRequest(key=k, output=answer("x")))
        assert stored.outcome == pb.STORE_OUTCOME_ERROR
        stats = await client.unary(client.stub.Stats, pb.StatsRequest())
        assert stats.errors == 2
        await eventually(lambda: _health_is(client, health_pb2.HealthCheckResponse.NOT_SERVING))

        redis.start()
        await eventually(lambda: _health_is(client, health_pb2.HealthCheckResponse.SERVING))
        await asyncio.sleep(0.15)  # the cooldown
        assert (
            await client.unary(client.stub.Store, pb.StoreRequest(key=k, output=answer("x")))
        ).outcome == (pb.STORE_OUTCOME_STORED)
        assert (
            await client.unary(client.stub.Lookup, pb.LookupRequest(key=k))
        ).outcome == pb.CACHE_OUTCOME_HIT
    finally:
        await running.stop()


async def _health_is(client: object, status: int) -> bool:
    return await client.health() == status  # type: ignore[attr-defined, no-any-return]
