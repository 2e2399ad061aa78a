"""Wires the cache: settings -> Redis backend -> :class:`ResponseCache` -> gRPC servicer (``llmops serve cache``).

The response cache itself is the shared library :mod:`llmops.common.response_cache`; serving builds
its in-process one through the same :func:`~llmops.common.response_cache.build.build_response_cache`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from llmops.cache.grpc_app import SERVICE_NAME, CacheServicer
from llmops.common.app import ServiceApp
from llmops.common.errors import Unavailable
from llmops.common.response_cache.build import build_response_cache, start_backend
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings
from llmops.proto.cache.v1 import cache_service_pb2_grpc as pb_grpc


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
