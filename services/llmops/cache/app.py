"""Wires the cache: settings -> Redis backend -> :class:`ResponseCache` -> gRPC servicer (``llmops serve cache``).

:func:`build_response_cache` is also how serving gets its in-process cache (straight to Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from llmops.cache.backends.base import CacheBackend, CacheBackendError
from llmops.cache.backends.redis_backend import RedisCacheBackend
from llmops.cache.grpc_app import SERVICE_NAME, CacheServicer
from llmops.cache.metrics import CacheMetrics
from llmops.cache.service import CacheConfig, ResponseCache
from llmops.common.app import ServiceApp
from llmops.common.errors import Unavailable
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings
from llmops.proto.cache.v1 import cache_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Where Redis is when ``redis_url`` is unset: the one ``llmops up`` starts next to the services.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def build_backend(settings: Settings) -> RedisCacheBackend:
    section = settings.cache
    return RedisCacheBackend(
        settings.redis_url or DEFAULT_REDIS_URL,
        prefix=section.key_prefix,
        timeout_ms=section.redis_timeout_ms,
        maxmemory_bytes=section.maxmemory_bytes,
        maxmemory_policy=section.maxmemory_policy,
        configure=section.configure_redis,
    )


def build_response_cache(
    settings: Settings, registry: CollectorRegistry, backend: CacheBackend | None = None
) -> ResponseCache:
    """The response cache ``settings`` describe, metrics on ``registry``; call ``backend.start()``
    (or :func:`start_backend`) once before use and ``backend.close()`` at the end."""
    return ResponseCache(
        backend or build_backend(settings), CacheMetrics(registry), CacheConfig.from_settings(settings.cache)
    )


async def start_backend(cache: ResponseCache) -> bool:
    """Check or set Redis's memory bound; false (logged) when Redis cannot be reached yet."""
    try:
        await cache.backend.start()
    except CacheBackendError as exc:
        log.warning("Redis not reachable at start (%s); the cache fails open until it is", exc)
        return False
    return True


class CacheApp(ServiceApp):
    """The cache service hosted on one server."""

    def __init__(self, cache: ResponseCache, stats_refresh_seconds: float = 0.0) -> None:
        self.cache = cache
        self._refresh_seconds = stats_refresh_seconds
        self._configured = False
        self._refresh: asyncio.Task[None] | None = None

    def bindings(self) -> Sequence[ServiceBinding]:
        return [
            ServiceBinding(
                SERVICE_NAME,
                CacheServicer(self.cache),
                pb_grpc.add_CacheServiceServicer_to_server,
                self.readiness,
            )
        ]

    async def start(self) -> None:
        self._configured = await start_backend(self.cache)
        if self._refresh_seconds > 0:
            self._refresh = asyncio.create_task(self._refresh_gauges(), name="llmops-cache-gauges")

    async def readiness(self) -> bool:
        """Ready while Redis answers (memory settings are applied once it first does)."""
        if not await self.cache.ping():
            return False
        if not self._configured:
            self._configured = await start_backend(self.cache)
        return True

    async def _refresh_gauges(self) -> None:
        while True:
            with contextlib.suppress(Unavailable):
                await self.cache.refresh_sizes()
            await asyncio.sleep(self._refresh_seconds)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        await self.cache.backend.close()


def build_app(settings: Settings, registry: CollectorRegistry) -> CacheApp:
    """The cache service on Redis as ``settings`` describe it; metrics go to ``registry``."""
    return CacheApp(build_response_cache(settings, registry), settings.cache.stats_refresh_seconds)
