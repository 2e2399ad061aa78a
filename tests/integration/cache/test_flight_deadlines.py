"""Single flight never makes a request miss its deadline (real Redis, several cache instances).

Invariants: an identical request whose deadline is shorter than the leader's compute stops waiting
after ``single_flight_wait_share`` of its remaining time and answers with its own computation, well
before its deadline, while the leader is still computing; waiters with generous deadlines still get
the leader's answer (one computation); a cache in front (the router's, ``lock_scope="router"``)
whose leader's computation goes through the cache behind it (serving's) on the same key and Redis
is not blocked by its own lock; a Redis that stalls while the leader computes (renewals, store,
release) costs the leader at most a few ``redis_timeout_ms``, never the stall.

The bounds given to ``asyncio.wait_for`` are the requests' deadlines, not speed goals: before the
fix a waiter waited ``single_flight_wait`` (60 s) whatever its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from llmops.cache.redis_server import RedisServer
from llmops.common.response_cache import keys
from llmops.common.response_cache.build import build_response_cache, start_backend
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.response_cache.codec import GeneratedOutputCodec
from llmops.common.response_cache.domain import LookupOutcome, Prompt, ResolvedModel, SamplingParams
from llmops.common.settings import Settings
from llmops.proto.common.v1 import generation_pb2
from tests.integration.cache.conftest import unique_model

CODEC = GeneratedOutputCodec()


def settings(url: str, **extra: str) -> Settings:
    return Settings.load(
        env={
            "LLMOPS_REDIS_URL": url,
            "LLMOPS_CACHE_REDIS_TIMEOUT_MS": "200",
            "LLMOPS_CACHE_SINGLE_FLIGHT_LOCK_MS": "300",
            "LLMOPS_CACHE_SINGLE_FLIGHT_POLL_MS": "5",
            **{f"LLMOPS_CACHE_{k.upper()}": v for k, v in extra.items()},
        }
    )


@pytest_asyncio.fixture(loop_scope="session")
async def replicas(redis_server: RedisServer) -> AsyncIterator[list[ResponseCache]]:
    caches = [build_response_cache(settings(redis_server.url), CollectorRegistry()) for _ in range(3)]
    yield caches
    for cache in caches:
        await cache.backend.close()


def key() -> keys.CacheKey:
    return keys.make_key(ResolvedModel(unique_model(), 1), Prompt(text="q"), SamplingParams(greedy=True))


def output(text: str) -> generation_pb2.GeneratedOutput:
    return generation_pb2.GeneratedOutput(
        completions=[generation_pb2.Completion(text=text, finish_reason=generation_pb2.FINISH_REASON_STOP)]
    )


async def test_a_waiter_with_a_short_deadline_answers_itself_before_it(replicas: list[ResponseCache]) -> None:
    k = key()
    computing, release = asyncio.Event(), asyncio.Event()

    async def slow_leader() -> generation_pb2.GeneratedOutput:
        computing.set()
        await release.wait()  # its replica is draining: it answers only after the waiters' deadlines
        return output("leader")

    leader = asyncio.create_task(replicas[0].get_or_compute(k, slow_leader, CODEC))
    await asyncio.wait_for(computing.wait(), 10)
    waiters = [
        asyncio.wait_for(
            replicas[1 + i % 2].get_or_compute(
                k, lambda: asyncio.sleep(0.01, output("own")), CODEC, timeout=2.0
            ),
            2.0,  # the caller's deadline
        )
        for i in range(4)
    ]
    answers = await asyncio.gather(*waiters)
    assert not leader.done()  # they did not wait for it
    assert [a.outcome for a in answers] == [LookupOutcome.MISS] * 4
    assert {a.value.completions[0].text for a in answers} == {"own"}
    release.set()
    assert (await leader).value.completions[0].text == "leader"


async def test_waiters_with_long_deadlines_get_the_leaders_answer(replicas: list[ResponseCache]) -> None:
    k = key()
    calls = 0

    async def engine() -> generation_pb2.GeneratedOutput:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return output("once")

    answers = await asyncio.gather(
        *(replicas[i % 3].get_or_compute(k, engine, CODEC, timeout=30.0) for i in range(9))
    )
    assert calls == 1
    assert {a.value.completions[0].text for a in answers} == {"once"}
    assert sorted(a.outcome.value for a in answers) == ["hit"] * 8 + ["miss"]


async def test_a_front_tier_leader_is_not_blocked_by_its_own_lock(replicas: list[ResponseCache]) -> None:
    """The router's leader forwards to serving, which looks the same key up in the same Redis."""
    router, serving = replicas[0], replicas[1]
    k = key()
    calls = 0

    async def engine() -> generation_pb2.GeneratedOutput:
        nonlocal calls
        calls += 1
        return output("served")

    async def forward() -> generation_pb2.GeneratedOutput:
        # serving without a deadline: it would wait single_flight_wait (60 s) on a lock it shares
        return (await serving.get_or_compute(k, engine, CODEC)).value

    answer = await asyncio.wait_for(
        router.get_or_compute(k, forward, CODEC, timeout=None, lock_scope="router"), 10
    )
    assert answer.outcome is LookupOutcome.MISS and answer.value.completions[0].text == "served"
    assert calls == 1
    again = await serving.get_or_compute(k, engine, CODEC)
    assert again.outcome is LookupOutcome.HIT and calls == 1


async def test_a_redis_stall_while_leading_costs_timeouts_not_the_stall(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    redis = make_redis_server()
    cache = build_response_cache(
        settings(redis.url, redis_timeout_ms="50", failure_cooldown_ms="0"), CollectorRegistry()
    )
    await start_backend(cache)
    k = key()
    async with aioredis.Redis.from_url(redis.url) as admin:

        async def engine() -> generation_pb2.GeneratedOutput:
            assert await admin.client_pause(1500)  # Redis stops answering the cache for 1.5 s
            await asyncio.sleep(0.3)  # renewals run into the stall meanwhile
            return output("computed")

        # compute 0.3 s, then a store and a release that time out (50 ms each): far within the stall
        answer = await asyncio.wait_for(cache.get_or_compute(k, engine, CODEC, timeout=10.0), 1.2)
        assert answer.outcome is LookupOutcome.MISS and answer.value.completions[0].text == "computed"
        await admin.client_unpause()
    await cache.backend.close()
