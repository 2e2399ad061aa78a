"""The Redis backend: one round trip per lookup and per store, invalidation that eviction cannot undo.

Layout (``P`` is the configured key prefix):

* ``P g:<model>`` and ``P g:<model>:<version>``: generation tokens, random strings. An entry's key
  embeds the tokens of its model and version (and of its adapter's): ``P e:<tokens>:<tenant tag>:
  <digest>``. Invalidating a model or a version replaces its token (O(1)), so every entry under the
  old token becomes unreachable at once and expires by TTL or LRU. A token evicted by LRU is simply
  made anew on the next store, which also orphans the old entries: eviction never resurrects an
  invalidated entry, it can only cost hits.
* ``P ix:<model>:v:<version>`` and ``P ix:<model>:a:<alias>``: sorted sets of the entry keys stored
  under that version / alias, scored by expiry (ms; +inf for none). They are pruned of expired
  members on every store, expire with their last member, and are listed in ``P ixs:<model>``. They
  serve alias- and tenant-scoped invalidation (which have no token) and eager deletion, so
  ``removed`` counts real entries and memory comes back at once. Alias scope needs no token for
  correctness: keys hold the resolved version, so an alias that moves reaches other keys.
* ``P lock:<digest>``: single-flight locks (``SET NX PX``; released and extended only by their token).

Lookup and store are Lua scripts (atomic, one round trip; redis-py reloads them after a restart).
The scripts touch keys of several models, so this runs on standalone or Sentinel Redis, not Cluster.
Every command has the configured timeout and no client-side retries: failing fast is the point.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from llmops.common.response_cache.backends.base import (
    CacheBackend,
    CacheBackendError,
    decode_entry,
    encode_entry,
)
from llmops.common.response_cache.domain import BackendSizes, CacheKey, InvalidationScope, StoredEntry

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOOKUP = """
local gens = {}
for i = 1, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if not g then return false end
  gens[i] = g
end
return redis.call('GET', ARGV[1] .. table.concat(gens, '.') .. ARGV[2])
"""

# KEYS: n generation keys, m index keys, m model index lists (one per index key).
# ARGV: n, m, fresh token, entry prefix, entry suffix, value, ttl ms (0: none), score, now ms.
_STORE = """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local gens = {}
for i = 1, n do
  local g = redis.call('GET', KEYS[i])
  if not g then
    g = ARGV[3] .. i
    redis.call('SET', KEYS[i], g)
  end
  gens[i] = g
end
local entry = ARGV[4] .. table.concat(gens, '.') .. ARGV[5]
local ttl = tonumber(ARGV[7])
if ttl > 0 then
  redis.call('SET', entry, ARGV[6], 'PX', ttl)
else
  redis.call('SET', entry, ARGV[6])
end
for j = 1, m do
  local ix = KEYS[n + j]
  redis.call('ZREMRANGEBYSCORE', ix, '-inf', '(' .. ARGV[9])
  redis.call('ZADD', ix, ARGV[8], entry)
  local last = redis.call('ZRANGE', ix, -1, -1, 'WITHSCORES')
  if last[2] == 'inf' then
    redis.call('PERSIST', ix)
  else
    redis.call('PEXPIREAT', ix, string.format('%d', tonumber(last[2])))
  end
  redis.call('SADD', KEYS[n + m + j], ix)
end
return entry
"""

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_BATCH = 500


@dataclass(frozen=True)
class MemoryPolicy:
    """Redis's memory bound and eviction policy as found (and set) at start."""

    maxmemory: int | None
    policy: str | None
    applied: bool


def tenant_tag(tenant: str) -> str:
    """A fixed-length tag of a tenant for key names (tenants are free text)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


class RedisCacheBackend(CacheBackend):
    """Entries in Redis (see the module docstring for the layout)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "llmops:cache:",
        timeout_ms: int = 50,
        maxmemory_bytes: int = 0,
        maxmemory_policy: str = "allkeys-lru",
        configure: bool = True,
    ) -> None:
        timeout = timeout_ms / 1000
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.prefix = prefix
        self._maxmemory = maxmemory_bytes
        self._policy = maxmemory_policy
        self._configure = configure
        self._lookup = self._redis.register_script(_LOOKUP)
        self._store = self._redis.register_script(_STORE)
        self._extend = self._redis.register_script(_EXTEND)
        self._release = self._redis.register_script(_RELEASE)
        self.memory_policy: MemoryPolicy | None = None

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client (benchmarks and tests)."""
        return self._redis

    # --- key names ---------------------------------------------------------------------------------

    def _gen_keys(self, key: CacheKey) -> list[str]:
        names = [f"{self.prefix}g:{key.model.name}", f"{self.prefix}g:{key.model.name}:{key.model.version}"]
        if key.adapter is not None:
            names += [
                f"{self.prefix}g:{key.adapter.name}",
                f"{self.prefix}g:{key.adapter.name}:{key.adapter.version}",
            ]
        return names

    def _entry_parts(self, key: CacheKey) -> tuple[str, str]:
        return f"{self.prefix}e:", f":{tenant_tag(key.tenant)}:{key.digest}"

    def _ix_version(self, name: str, version: int) -> str:
        return f"{self.prefix}ix:{name}:v:{version}"

    def _ix_alias(self, name: str, alias: str) -> str:
        return f"{self.prefix}ix:{name}:a:{alias}"

    def _ix_list(self, name: str) -> str:
        return f"{self.prefix}ixs:{name}"

    def _member_tenant(self, member: bytes) -> str:
        # member = P e:<tokens>:<tenant tag>:<digest>
        return member.decode()[len(self.prefix) + 2 :].split(":", 2)[1]

    # --- error handling ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _failing_open(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheBackendError(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        async with self._failing_open(what):
            return await awaitable

    # --- entries -----------------------------------------------------------------------------------

    async def get(self, key: CacheKey) -> StoredEntry | None:
        prefix, suffix = self._entry_parts(key)
        data = await self._call("lookup", self._lookup(keys=self._gen_keys(key), args=[prefix, suffix]))
        return None if data is None else decode_entry(cast(bytes, data))

    async def put(self, key: CacheKey, payload: bytes, *, stored_at_ms: int, ttl_ms: int) -> None:
        gens = self._gen_keys(key)
        indexes: list[tuple[str, str]] = []  # (index key, its model's index list)
        for model in (key.model, key.adapter):
            if model is None:
                continue
            indexes.append((self._ix_version(model.name, model.version), self._ix_list(model.name)))
            if model.alias:
                indexes.append((self._ix_alias(model.name, model.alias), self._ix_list(model.name)))
        expires_ms = stored_at_ms + ttl_ms if ttl_ms else 0
        prefix, suffix = self._entry_parts(key)
        args: list[Any] = [
            len(gens),
            len(indexes),
            os.urandom(6).hex() + "-",
            prefix,
            suffix,
            encode_entry(payload, stored_at_ms, expires_ms),
            ttl_ms,
            expires_ms if ttl_ms else "+inf",
            stored_at_ms,
        ]
        keys = gens + [ix for ix, _ in indexes] + [owner for _, owner in indexes]
        await self._call("store", self._store(keys=keys, args=args))

    async def invalidate(self, scope: InvalidationScope) -> int:
        name = scope.model_name
        async with self._failing_open("invalidate"):
            if scope.version is not None:
                indexes = [self._ix_version(name, scope.version)]
            elif scope.alias is not None:
                indexes = [self._ix_alias(name, scope.alias)]
            else:
                listed = await cast(Awaitable[set[bytes]], self._redis.smembers(self._ix_list(name)))
                indexes = sorted(m.decode() for m in listed)
            tag = None if scope.tenant is None else tenant_tag(scope.tenant)
            snapshot: dict[str, list[bytes]] = {}
            for ix in indexes:
                members = [m async for m, _ in self._redis.zscan_iter(ix, count=1000)]
                snapshot[ix] = [m for m in members if tag is None or self._member_tenant(m) == tag]
            if tag is None and scope.alias is None:
                # The token swap is what guarantees it: entries missing from an (evicted) index die too.
                token_key = f"{self.prefix}g:{name}" + (
                    f":{scope.version}" if scope.version is not None else ""
                )
                await self._redis.set(token_key, os.urandom(6).hex() + "-")
            doomed = sorted({m for members in snapshot.values() for m in members})
            removed = 0
            for start in range(0, len(doomed), _BATCH):
                removed += int(await self._redis.unlink(*doomed[start : start + _BATCH]))
            for ix, members in snapshot.items():
                for start in range(0, len(members), _BATCH):
                    await self._redis.zrem(ix, *members[start : start + _BATCH])
            return removed

    # --- locks -------------------------------------------------------------------------------------

    def _lock_key(self, name: str) -> str:
        return f"{self.prefix}lock:{name}"

    async def try_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        taken = await self._call("lock", self._redis.set(self._lock_key(name), token, nx=True, px=ttl_ms))
        return bool(taken)

    async def extend_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        result = await self._call(
            "extend lock", self._extend(keys=[self._lock_key(name)], args=[token, ttl_ms])
        )
        return bool(result)

    async def release_lock(self, name: str, token: str) -> None:
        await self._call("release lock", self._release(keys=[self._lock_key(name)], args=[token]))

    # --- sizes, health, memory ---------------------------------------------------------------------

    async def sizes(self) -> BackendSizes:
        """Counts by SCAN over the prefix: O(keys in the database), so call it now and then."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"
        entry_prefix = f"{self.prefix}e:".encode()
        entries = total = 0
        async with self._failing_open("sizes"):
            batch: list[bytes] = []
            async for name in self._redis.scan_iter(match=pattern, count=1000):
                batch.append(name)
                entries += name.startswith(entry_prefix)
                if len(batch) >= _BATCH:
                    total += await self._memory(batch)
                    batch = []
            total += await self._memory(batch)
        return BackendSizes(entries, total)

    async def _memory(self, names: list[bytes]) -> int:
        if not names:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.memory_usage(name, samples=0)
        return sum(int(size or 0) for size in await pipe.execute())

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def start(self) -> None:
        """Check, and when configured set, maxmemory and the eviction policy.

        A managed Redis that forbids CONFIG is tolerated with a warning (set them there yourself);
        an unreachable one raises :class:`CacheBackendError` (the app retries from its readiness).
        """
        self.memory_policy = await self.configure_memory()

    async def configure_memory(self) -> MemoryPolicy:
        async with self._failing_open("config"):
            try:
                found = await self._config_get()
            except ResponseError as exc:
                log.warning(
                    "cannot read Redis's memory settings (%s); make sure maxmemory and an LRU policy are set",
                    exc,
                )
                return MemoryPolicy(None, None, applied=False)
            maxmemory, policy = found
            wanted_memory = self._maxmemory or maxmemory
            if (wanted_memory, self._policy) == (maxmemory, policy):
                return MemoryPolicy(maxmemory, policy, applied=True)
            if not self._configure:
                log.warning(
                    "Redis has maxmemory=%s policy=%s; the cache wants maxmemory=%s policy=%s",
                    maxmemory, policy, wanted_memory, self._policy,
                )  # fmt: skip
                return MemoryPolicy(maxmemory, policy, applied=False)
            try:
                if self._maxmemory:
                    await self._redis.config_set("maxmemory", self._maxmemory)
                await self._redis.config_set("maxmemory-policy", self._policy)
            except ResponseError as exc:
                log.warning("cannot set Redis's memory settings (%s); set them on the server", exc)
                return MemoryPolicy(maxmemory, policy, applied=False)
            log.info("Redis memory bound set: maxmemory=%s policy=%s", wanted_memory, self._policy)
            return MemoryPolicy(wanted_memory, self._policy, applied=True)

    async def _config_get(self) -> tuple[int, str]:
        found = cast(dict[Any, Any], await self._redis.config_get("maxmemory*"))
        values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in found.items()}
        memory = values.get("maxmemory", b"0")
        policy = values.get("maxmemory-policy", b"")
        return int(memory), policy.decode() if isinstance(policy, bytes) else str(policy)

    async def close(self) -> None:
        await self._redis.aclose()
