"""What an operator sees with grpcurl: health, reflection `list` and `describe` on a real server.

Invariants: every server answers grpc.health.v1 and reflection, and reflection can describe our own
services together with the shared messages they import.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest_asyncio

from llmops.common.process import create_subprocess_exec
from llmops.common.server import LLMOpsServer, ServiceBinding, create_server
from llmops.common.settings import Settings
from llmops.proto.cache.v1 import cache_service_pb2_grpc
from tests.conftest import require_tool

CACHE = "llmops.cache.v1.CacheService"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server() -> AsyncIterator[LLMOpsServer]:
    binding = ServiceBinding(
        CACHE,
        cache_service_pb2_grpc.CacheServiceServicer(),  # the generated base: every RPC is UNIMPLEMENTED
        cache_service_pb2_grpc.add_CacheServiceServicer_to_server,
    )
    srv, _ = await create_server("127.0.0.1:0", [binding], Settings.load(env={}))
    yield srv
    await srv.stop(0)


async def _grpcurl(*args: str) -> tuple[int, str, str]:
    proc = await create_subprocess_exec(
        require_tool("grpcurl"), "-plaintext", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_grpcurl_list_shows_services(server: LLMOpsServer) -> None:
    code, out, err = await _grpcurl(f"127.0.0.1:{server.port}", "list")
    assert code == 0, err
    listed = set(out.split())
    assert {CACHE, "grpc.health.v1.Health"} <= listed


async def test_grpcurl_describes_our_service_and_shared_messages(server: LLMOpsServer) -> None:
    code, out, err = await _grpcurl(f"127.0.0.1:{server.port}", "describe", CACHE)
    assert code == 0, err
    assert "rpc Lookup" in out and "rpc Invalidate" in out
    code, out, err = await _grpcurl(f"127.0.0.1:{server.port}", "describe", "llmops.common.v1.SamplingParams")
    assert code == 0, err
    assert "temperature" in out


async def test_grpcurl_health_check(server: LLMOpsServer) -> None:
    code, out, err = await _grpcurl(f"127.0.0.1:{server.port}", "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}
    code, out, err = await _grpcurl(
        "-d", json.dumps({"service": CACHE}), f"127.0.0.1:{server.port}", "grpc.health.v1.Health/Check"
    )
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}
