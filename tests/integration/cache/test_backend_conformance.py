"""Every cache backend keeps the same promises (run against the fake and a real Redis).

Invariants: an entry reads back exactly as written and a new store replaces it; entries expire after
their TTL and not before; Invalidate removes exactly the entries whose model or adapter matches the
name, version or alias (and tenant, when given), reports how many, and leaves the rest; stores after
an invalidation are visible again; locks are exclusive, expire, and are extended or released only
by their holder; sizes count the live entries.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from llmops.cache.redis_server import RedisServer
from llmops.common.response_cache import keys
from llmops.common.response_cache.backends.base import CacheBackend
from llmops.common.response_cache.backends.fake import FakeCacheBackend
from llmops.common.response_cache.backends.redis_backend import RedisCacheBackend
from llmops.common.response_cache.domain import (
    CacheKey,
    InvalidationScope,
    Prompt,
    ResolvedModel,
    SamplingParams,
)
from tests.integration.cache.conftest import unique_model

GREEDY = SamplingParams(greedy=True)


@pytest_asyncio.fixture(params=["fake", "redis"], loop_scope="session")
async def backend(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[CacheBackend]:
    if request.param == "fake":
        yield FakeCacheBackend()
        return
    # A prefix of its own per test: the server is shared, and sizes() counts by prefix.
    redis = RedisCacheBackend(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:", timeout_ms=1000)
    await redis.start()
    yield redis
    await redis.close()


def key(
    model: str,
    version: int = 1,
    *,
    alias: str = "",
    text: str = "hi",
    tenant: str = "",
    adapter: ResolvedModel | None = None,
) -> CacheKey:
    return keys.make_key(
        ResolvedModel(model, version, alias), Prompt(text=text), GREEDY, tenant=tenant, adapter=adapter
    )


async def put(backend: CacheBackend, k: CacheKey, payload: bytes = b"answer", ttl_ms: int = 0) -> None:
    await backend.put(k, payload, stored_at_ms=int(time.time() * 1000), ttl_ms=ttl_ms)


async def present(backend: CacheBackend, *ks: CacheKey) -> list[bool]:
    return [await backend.get(k) is not None for k in ks]


async def test_entries_read_back_exactly_and_are_replaced(backend: CacheBackend) -> None:
    k = key(unique_model())
    assert await backend.get(k) is None
    await backend.put(k, b"\x00first\xff", stored_at_ms=1_700_000_000_123, ttl_ms=60_000)
    entry = await backend.get(k)
    assert entry is not None and entry.payload == b"\x00first\xff"
    assert entry.stored_at.timestamp() == 1_700_000_000.123
    assert entry.expires_at is not None and entry.expires_at.timestamp() == 1_700_000_060.123
    await put(backend, k, b"second")
    replaced = await backend.get(k)
    assert replaced is not None and replaced.payload == b"second" and replaced.expires_at is None


async def test_entries_expire_after_their_ttl(backend: CacheBackend) -> None:
    short, forever = key(unique_model()), key(unique_model())
    await put(backend, short, ttl_ms=200)
    await put(backend, forever)
    assert await present(backend, short, forever) == [True, True]
    deadline = time.monotonic() + 5
    while await backend.get(short) is not None:
        assert time.monotonic() < deadline, "entry outlived its TTL"
        await asyncio.sleep(0.02)
    assert await backend.get(forever) is not None


async def test_invalidate_by_version(backend: CacheBackend) -> None:
    name, other = unique_model(), unique_model()
    v1, v2 = key(name, 1), key(name, 2)
    as_adapter = key(other, 1, adapter=ResolvedModel(name, 1))  # its adapter is name:1
    unrelated = key(other, 1)
    for k in (v1, v2, as_adapter, unrelated):
        await put(backend, k)
    assert await backend.invalidate(InvalidationScope(name, version=1)) == 2
    assert await present(backend, v1, v2, as_adapter, unrelated) == [False, True, False, True]


async def test_invalidate_by_model_covers_every_version_and_adapter_use(backend: CacheBackend) -> None:
    name, other = unique_model(), unique_model()
    entries = [key(name, 1), key(name, 7, alias="champion"), key(other, 2, adapter=ResolvedModel(name, 3))]
    unrelated = key(other, 2)
    for k in (*entries, unrelated):
        await put(backend, k)
    assert await backend.invalidate(InvalidationScope(name)) == 3
    assert await present(backend, *entries, unrelated) == [False, False, False, True]


async def test_invalidate_by_alias_removes_only_what_was_served_under_it(backend: CacheBackend) -> None:
    name = unique_model()
    via_champion = key(name, 1, alias="champion", text="a")
    via_challenger = key(name, 2, alias="challenger", text="b")
    direct = key(name, 1, text="c")
    for k in (via_champion, via_challenger, direct):
        await put(backend, k)
    assert await backend.invalidate(InvalidationScope(name, alias="champion")) == 1
    assert await present(backend, via_champion, via_challenger, direct) == [False, True, True]


async def test_invalidate_one_tenant(backend: CacheBackend) -> None:
    name = unique_model()
    acme, globex = key(name, 1, tenant="acme"), key(name, 1, tenant="globex")
    acme_v2 = key(name, 2, alias="champion", tenant="acme")
    for k in (acme, globex, acme_v2):
        await put(backend, k)
    assert await backend.invalidate(InvalidationScope(name, version=1, tenant="acme")) == 1
    assert await present(backend, acme, globex, acme_v2) == [False, True, True]
    assert await backend.invalidate(InvalidationScope(name, tenant="acme")) == 1
    assert await backend.invalidate(InvalidationScope(name, alias="champion", tenant="globex")) == 0
    assert await present(backend, acme_v2, globex) == [False, True]


async def test_stores_after_an_invalidation_are_visible(backend: CacheBackend) -> None:
    name = unique_model()
    k = key(name, 1)
    await put(backend, k)
    assert await backend.invalidate(InvalidationScope(name)) == 1
    assert await backend.invalidate(InvalidationScope(name)) == 0
    await put(backend, k, b"fresh")
    entry = await backend.get(k)
    assert entry is not None and entry.payload == b"fresh"


async def test_locks_are_exclusive_expire_and_belong_to_their_holder(backend: CacheBackend) -> None:
    name = f"lock-{uuid.uuid4().hex}"
    assert await backend.try_lock(name, "a", 150)
    assert not await backend.try_lock(name, "b", 150)
    assert not await backend.extend_lock(name, "b", 150)
    await backend.release_lock(name, "b")  # not the holder: no effect
    assert not await backend.try_lock(name, "b", 150)
    assert await backend.extend_lock(name, "a", 150)
    await backend.release_lock(name, "a")
    assert await backend.try_lock(name, "b", 150)
    deadline = time.monotonic() + 5
    while not await backend.try_lock(name, "c", 150):  # b never releases: its lock runs out
        assert time.monotonic() < deadline, "lock never expired"
        await asyncio.sleep(0.02)


async def test_sizes_count_live_entries(backend: CacheBackend) -> None:
    before = await backend.sizes()
    name = unique_model()
    for i in range(3):
        await put(backend, key(name, 1, text=str(i)), b"x" * 100)
    after = await backend.sizes()
    assert after.entries == before.entries + 3
    assert after.bytes >= before.bytes + 300
    await backend.invalidate(InvalidationScope(name))
    assert (await backend.sizes()).entries == before.entries
    assert await backend.ping()
