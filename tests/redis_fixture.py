"""Real ``redis-server`` processes for tests, on free ports; import the fixtures into a conftest.

``redis_server`` is one server per test module (share it, but use unique key prefixes or
``flushdb`` it); ``make_redis_server`` starts private ones (to stop and restart, or with extra
arguments) and stops every one it started when the test ends. A missing redis-server fails in CI
and skips elsewhere (:func:`tests.conftest.require_tool`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from llmops.cache.redis_server import RedisServer
from tests.conftest import require_tool


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server for the whole module."""
    server = RedisServer(require_tool("redis-server")).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def make_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Start private redis-servers: ``make_redis_server(extra_args=[...])``; all stopped at the end."""
    executable = require_tool("redis-server")
    started: list[RedisServer] = []

    def make(extra_args: list[str] | None = None) -> RedisServer:
        server = RedisServer(executable, extra_args)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.close()
