"""What only the Redis backend must get right: memory bound, eviction, and scripts across restarts.

Invariants: at start the cache sets maxmemory and allkeys-lru (or only checks them when told not to,
or when a managed Redis forbids CONFIG, and still works); under memory pressure stores keep
succeeding, old keys are evicted and memory stays bounded; an invalidation holds even when LRU has evicted the indexes
(the generation token does it), and an evicted token never brings invalidated entries back; expired
members leave the indexes; a Redis that lost its script cache (a restart) still serves lookups.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from llmops.cache.redis_server import RedisServer
from llmops.common.response_cache import keys
from llmops.common.response_cache.backends.redis_backend import RedisCacheBackend
from llmops.common.response_cache.domain import InvalidationScope, Prompt, ResolvedModel, SamplingParams
from tests.integration.cache.conftest import unique_model


def key(model: str, version: int = 1, text: str = "hi", alias: str = "") -> keys.CacheKey:
    return keys.make_key(ResolvedModel(model, version, alias), Prompt(text=text), SamplingParams(greedy=True))


def now_ms() -> int:
    return int(time.time() * 1000)


async def config(backend: RedisCacheBackend) -> tuple[int, str]:
    found = await backend.client.config_get("maxmemory*")
    return int(found["maxmemory"]), str(found["maxmemory-policy"])


async def test_start_sets_maxmemory_and_lru(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server()
    backend = RedisCacheBackend(server.url, maxmemory_bytes=32 * 1024 * 1024, maxmemory_policy="allkeys-lru")
    await backend.start()
    assert await config(backend) == (32 * 1024 * 1024, "allkeys-lru")
    assert backend.memory_policy is not None and backend.memory_policy.applied
    await backend.close()


async def test_check_only_leaves_the_server_alone(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server()
    backend = RedisCacheBackend(server.url, maxmemory_bytes=1 << 25, configure=False)
    await backend.start()
    assert await config(backend) == (0, "noeviction")  # Redis's defaults, untouched
    assert backend.memory_policy is not None and not backend.memory_policy.applied
    await backend.close()


async def test_managed_redis_without_config_is_tolerated(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server(extra_args=["--rename-command", "CONFIG", ""])
    backend = RedisCacheBackend(server.url, maxmemory_bytes=1 << 25)
    await backend.start()  # warns, does not raise
    assert backend.memory_policy is not None and not backend.memory_policy.applied
    k = key(unique_model())
    await backend.put(k, b"still works", stored_at_ms=now_ms(), ttl_ms=0)
    assert (await backend.get(k)) is not None
    await backend.close()


async def test_stores_keep_succeeding_under_memory_pressure(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server()
    backend = RedisCacheBackend(server.url, maxmemory_bytes=2 * 1024 * 1024, timeout_ms=2000)
    await backend.start()
    name = unique_model()
    written = [key(name, text=str(i)) for i in range(400)]  # ~4 MB into a 2 MB bound
    for k in written:
        await backend.put(k, b"x" * 10_000, stored_at_ms=now_ms(), ttl_ms=0)  # no OOM error
    info = await backend.client.info("stats")
    assert int(info["evicted_keys"]) > 0
    memory = await backend.client.info("memory")
    assert int(memory["used_memory"]) <= 2 * 1024 * 1024 * 1.1
    # LRU's clock ticks once a second, so which of these equally fresh keys went is arbitrary (a
    # generation token too, which turns its entries into misses, never into wrong answers). What
    # matters: lookups still answer, and a fresh answer is stored and found.
    for k in written[-20:]:
        await backend.get(k)
    # Let Redis's LRU clock (1 s resolution) tick, so the keys stored above are older than the fresh
    # answer and its generation token: otherwise the eviction that the fresh store triggers picks
    # among equally fresh keys and may take the new answer itself.
    await asyncio.sleep(1.1)
    fresh = key(name, text="fresh")
    await backend.put(fresh, b"y", stored_at_ms=now_ms(), ttl_ms=0)
    assert await backend.get(fresh) is not None
    await backend.close()


async def test_invalidation_holds_when_indexes_were_evicted(redis_server: RedisServer) -> None:
    backend = RedisCacheBackend(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:", timeout_ms=1000)
    name = unique_model()
    v1, v2 = key(name, 1), key(name, 2)
    for k in (v1, v2):
        await backend.put(k, b"answer", stored_at_ms=now_ms(), ttl_ms=0)
    indexes = [k async for k in backend.client.scan_iter(match=f"{backend.prefix}ix*")]
    assert indexes
    await backend.client.delete(*indexes)  # what allkeys-lru may do to cold indexes
    await backend.invalidate(InvalidationScope(name, version=1))
    assert await backend.get(v1) is None and await backend.get(v2) is not None
    await backend.invalidate(InvalidationScope(name))
    assert await backend.get(v2) is None
    await backend.close()


async def test_an_evicted_token_never_brings_entries_back(redis_server: RedisServer) -> None:
    backend = RedisCacheBackend(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:", timeout_ms=1000)
    name = unique_model()
    k = key(name)
    await backend.put(k, b"old", stored_at_ms=now_ms(), ttl_ms=0)
    await backend.client.delete(f"{backend.prefix}g:{name}")  # evicted token
    assert await backend.get(k) is None  # a miss, never a stale or wrong entry
    await backend.put(k, b"new", stored_at_ms=now_ms(), ttl_ms=0)
    entry = await backend.get(k)
    assert entry is not None and entry.payload == b"new"
    await backend.close()


async def test_expired_members_leave_the_index(redis_server: RedisServer) -> None:
    backend = RedisCacheBackend(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:", timeout_ms=1000)
    name = unique_model()
    await backend.put(key(name, text="a"), b"x", stored_at_ms=now_ms() - 10_000, ttl_ms=1)  # long expired
    await backend.put(key(name, text="b"), b"x", stored_at_ms=now_ms(), ttl_ms=60_000)
    index = f"{backend.prefix}ix:{name}:v:1"
    assert await backend.client.zcard(index) == 1
    assert 0 < await backend.client.pttl(index) <= 60_000  # the index lives as long as its last member
    await backend.close()


async def test_lookups_survive_a_flushed_script_cache(redis_server: RedisServer) -> None:
    backend = RedisCacheBackend(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:", timeout_ms=1000)
    k = key(unique_model())
    await backend.put(k, b"x", stored_at_ms=now_ms(), ttl_ms=0)
    await backend.client.script_flush()  # what a restarted Redis looks like to a connected client
    assert await backend.get(k) is not None
    await backend.put(k, b"y", stored_at_ms=now_ms(), ttl_ms=0)
    await backend.close()
