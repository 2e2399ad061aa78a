"""Single flight through a real Redis, across several cache instances (as several serving replicas).

Invariants: 20 concurrent identical misses spread over 4 replicas run the engine once and all get
its answer (19 hits); requests that differ are not serialized behind each other; when the lock's
holder dies without releasing it, a waiter computes once the lock expires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest_asyncio
from prometheus_client import CollectorRegistry

from llmops.cache.redis_server import RedisServer
from llmops.common.response_cache import keys
from llmops.common.response_cache.build import build_response_cache
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.response_cache.codec import GeneratedOutputCodec
from llmops.common.response_cache.domain import LookupOutcome, Prompt, ResolvedModel, SamplingParams
from llmops.common.settings import Settings
from llmops.proto.common.v1 import generation_pb2
from tests.integration.cache.conftest import unique_model

CODEC = GeneratedOutputCodec()


@pytest_asyncio.fixture(loop_scope="session")
async def replicas(redis_server: RedisServer) -> AsyncIterator[list[ResponseCache]]:
    settings = Settings.load(
        env={
            "LLMOPS_REDIS_URL": redis_server.url,
            "LLMOPS_CACHE_REDIS_TIMEOUT_MS": "1000",
            "LLMOPS_CACHE_SINGLE_FLIGHT_LOCK_MS": "300",
            "LLMOPS_CACHE_SINGLE_FLIGHT_POLL_MS": "5",
        }
    )
    caches = [build_response_cache(settings, CollectorRegistry()) for _ in range(4)]
    yield caches
    for cache in caches:
        await cache.backend.close()


def key(text: str = "q") -> keys.CacheKey:
    return keys.make_key(
        ResolvedModel(unique_model(), 1), Prompt(text=text), SamplingParams(temperature=0.7, seed=1)
    )


async def test_twenty_identical_requests_run_the_engine_once(replicas: list[ResponseCache]) -> None:
    k = key()
    calls = 0

    async def engine() -> generation_pb2.GeneratedOutput:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return generation_pb2.GeneratedOutput(
            completions=[
                generation_pb2.Completion(text="once", finish_reason=generation_pb2.FINISH_REASON_STOP)
            ]
        )

    results = await asyncio.gather(*(replicas[i % 4].get_or_compute(k, engine, CODEC) for i in range(20)))
    assert calls == 1
    assert {r.value.completions[0].text for r in results} == {"once"}
    assert sorted(r.outcome.value for r in results) == ["hit"] * 19 + ["miss"]


async def test_different_requests_do_not_wait_for_each_other(replicas: list[ResponseCache]) -> None:
    async def engine() -> generation_pb2.GeneratedOutput:
        await asyncio.sleep(0.2)
        return generation_pb2.GeneratedOutput()

    started = time.perf_counter()
    await asyncio.gather(*(replicas[i % 4].get_or_compute(key(str(i)), engine, CODEC) for i in range(10)))
    assert time.perf_counter() - started < 1.0  # 10 x 0.2 s would be 2 s in series


async def test_a_dead_holders_lock_is_taken_over(replicas: list[ResponseCache]) -> None:
    k = key()
    assert await replicas[0].backend.try_lock(k.digest, "crashed-replica", 300)  # and never released
    started = time.perf_counter()
    result = await replicas[1].get_or_compute(
        k, lambda: asyncio.sleep(0, generation_pb2.GeneratedOutput()), CODEC
    )
    waited = time.perf_counter() - started
    assert result.outcome is LookupOutcome.MISS
    assert 0.25 < waited < 2.0, waited
