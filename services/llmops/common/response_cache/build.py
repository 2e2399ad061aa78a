"""A :class:`ResponseCache` from the settings: how the cache service and serving (in process) get one."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from llmops.common.response_cache.backends.base import CacheBackend, CacheBackendError
from llmops.common.response_cache.backends.redis_backend import RedisCacheBackend
from llmops.common.response_cache.cache import CacheConfig, ResponseCache
from llmops.common.response_cache.metrics import CacheMetrics
from llmops.common.settings import Settings

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
