"""Real Redis servers (from :mod:`tests.redis_fixture`) and a cache service on 127.0.0.1 port 0,
started the way ``llmops serve cache`` starts it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_asyncio

from llmops.cache.app import CacheApp, build_app
from llmops.cache.redis_server import RedisServer
from llmops.common.app import start_app
from llmops.common.clients import CacheClient
from llmops.common.server import LLMOpsServer
from llmops.common.settings import Settings
from tests.redis_fixture import make_redis_server, redis_server

__all__ = [
    "RunningCache",
    "cache_service",
    "make_redis_server",
    "redis_server",
    "start_cache",
    "unique_model",
]


def unique_model() -> str:
    """A model name no other test uses (tests share a Redis)."""
    return f"m-{uuid.uuid4().hex[:10]}"


@dataclass
class RunningCache:
    server: LLMOpsServer
    app: CacheApp
    client: CacheClient
    settings: Settings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        await self.client.close()
        await self.server.stop(0)
        await self.app.close()


async def start_cache(redis_url: str, *, ready: bool = True, **cache: object) -> RunningCache:
    env = {
        "LLMOPS_REDIS_URL": redis_url,
        "LLMOPS_HEALTH_POLL_SECONDS": "0.05",
        "LLMOPS_GRACE_SECONDS": "1",
        "LLMOPS_CACHE_REDIS_TIMEOUT_MS": "500",
        "LLMOPS_CACHE_MAXMEMORY_BYTES": str(64 * 1024 * 1024),
    }
    env.update({f"LLMOPS_CACHE_{name.upper()}": str(value) for name, value in cache.items()})
    settings = Settings.load(env=env)
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    assert isinstance(app, CacheApp)
    client = CacheClient.connect(f"127.0.0.1:{server.port}", timeout=10)
    if ready:
        await client.wait_ready(timeout=20, interval=0.02)
    return RunningCache(server, app, client, settings)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cache_service(redis_server: RedisServer) -> AsyncIterator[RunningCache]:
    running = await start_cache(redis_server.url)
    yield running
    await running.stop()
