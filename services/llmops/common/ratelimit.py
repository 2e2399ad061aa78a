"""Per-tenant rate limits: token buckets in Redis, shared by every replica of every service.

Two budgets per tenant, from the keys file (:class:`~llmops.common.auth.TenantLimits`):

* requests per minute: every authenticated call takes one from the tenant's ``requests`` bucket
  before its handler runs;
* tokens per minute: a generation may start while the tenant's ``tokens`` bucket is above zero, and
  is charged what it used (prompt + generated tokens) when it ends. Charging after the fact is
  exact; one long request can take the bucket below zero, and the tenant then waits until it
  refills.

A bucket holds at most one minute's budget (the burst) and refills continuously. Over a limit:
RESOURCE_EXHAUSTED with the time until the bucket has enough again (``RetryInfo`` in the status
details, ``Retry-After`` over HTTP). Each check is one Lua script (atomic, one round trip, Redis'
own clock so replicas agree). When Redis cannot be reached within the timeout the limiter
fails open (calls pass, a warning is logged at most every 30 s) or, with ``fail_open=False``,
closed (UNAVAILABLE).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from llmops.common.auth import Identity
from llmops.common.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

# KEYS[1]: bucket. ARGV: capacity, refill per second, cost, mode (take | peek | charge).
# Returns {allowed (0/1), seconds until `cost` would fit (string)}.
_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local mode = ARGV[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
  at = now
end
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if mode == 'charge' then
  tokens = tokens - cost
  allowed = 1
elseif mode == 'peek' then
  if tokens > 0 then allowed = 1 else wait = (1 - tokens) / rate end
elseif tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return {allowed, tostring(wait)}
"""


class RateLimiter:
    """Checks and charges tenants' buckets in the Redis at ``url``."""

    def __init__(
        self, url: str, *, fail_open: bool = True, timeout_ms: int = 200, prefix: str = "llmops:rl"
    ) -> None:
        timeout = timeout_ms / 1000
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        self._script: Any = self._redis.register_script(_BUCKET)
        self._fail_open = fail_open
        self._prefix = prefix
        self._warned = 0.0

    async def close(self) -> None:
        await self._redis.aclose()

    async def admit_request(self, identity: Identity | None) -> None:
        """Take one request from the caller's tenant (no-op without a request limit)."""
        limit = identity.limits.requests_per_minute if identity is not None else None
        if identity is None or limit is None:
            return
        await self._bucket(identity.tenant, "requests", limit, 1, "take")

    async def admit_generation(self, identity: Identity | None) -> None:
        """Refuse a generation while the tenant's token budget is spent."""
        limit = identity.limits.tokens_per_minute if identity is not None else None
        if identity is None or limit is None:
            return
        await self._bucket(identity.tenant, "tokens", limit, 1, "peek")

    async def charge_tokens(self, identity: Identity | None, tokens: int) -> None:
        """Charge a finished generation's tokens to its tenant."""
        limit = identity.limits.tokens_per_minute if identity is not None else None
        if identity is None or limit is None or tokens <= 0:
            return
        await self._bucket(identity.tenant, "tokens", limit, tokens, "charge")

    async def _bucket(self, tenant: str, kind: str, per_minute: int, cost: int, mode: str) -> None:
        key = f"{self._prefix}:{tenant}:{kind}"
        try:
            allowed, wait = await self._script(keys=[key], args=[per_minute, per_minute / 60.0, cost, mode])
        except (RedisError, OSError) as exc:
            if not self._fail_open:
                raise Unavailable(f"the rate limiter cannot reach Redis: {type(exc).__name__}") from None
            now = time.monotonic()
            if now - self._warned > 30:
                self._warned = now
                log.warning(
                    "rate limits not enforced: Redis unreachable (%s); failing open", type(exc).__name__
                )
            return
        if int(allowed) != 1:
            seconds = max(0.001, float(wait))
            unit = "requests" if kind == "requests" else "tokens"
            raise ResourceExhausted(
                f"tenant {tenant!r} is over its limit of {per_minute} {unit} per minute; retry in {seconds:.1f} s",
                retry_after_seconds=seconds,
            )


def limiter_from_settings(settings: Any) -> RateLimiter | None:
    """The limiter on ``settings.redis_url`` (``None`` without Redis: limits cannot be shared, so none apply)."""
    if not settings.redis_url:
        if settings.api_keys_file is not None:
            log.warning("API keys are configured but redis_url is not: tenant rate limits are not enforced")
        return None
    return RateLimiter(settings.redis_url, fail_open=settings.rate_limit_fail_open)
