"""Real serving replicas (processes, fake engine, see :mod:`tests.integration.router.replica`) and a
router on 127.0.0.1 port 0, started as ``llmops serve router`` starts it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio

from llmops.common.app import start_app
from llmops.common.clients import ServingClient, open_channel
from llmops.common.process import create_subprocess_exec
from llmops.common.server import LLMOpsServer
from llmops.common.settings import Settings
from llmops.proto.router.v1 import router_service_pb2 as rpb
from llmops.proto.router.v1 import router_service_pb2_grpc as rpb_grpc
from llmops.router.app import RouterApp, build_app

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    port: int
    http_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> None:
        if self.process.returncode is None:
            os.kill(self.process.pid, sig)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.signal(signal.SIGKILL)
        await self.process.wait()


async def start_replica(
    *,
    name: str = "tiny",
    version: int = 1,
    alias: str = "champion",
    step_delay: float = 0.0,
    concurrency: int = 4,
    port: int = 0,
    faults: str = "",
    redis_url: str = "",
) -> Replica:
    process = await create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.router.replica",
        f"--name={name}",
        f"--version={version}",
        f"--alias={alias}",
        f"--step-delay={step_delay}",
        f"--concurrency={concurrency}",
        f"--port={port}",
        f"--faults={faults}",
        f"--redis-url={redis_url}",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
    except BaseException:
        process.kill()
        await process.wait()
        raise
    assert line.startswith("llmops serving listening"), f"replica did not start: {line!r}"
    parts = dict(part.split("=") for part in line.split()[3:])
    return Replica(process, int(parts["grpc"]), int(parts["http"]))


async def poll_until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "") -> float:
    """Seconds until ``check()`` holds (polled every 10 ms); fails after ``timeout``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@dataclass
class RunningRouter:
    server: LLMOpsServer
    app: RouterApp
    client: ServingClient
    admin: Any  # RouterServiceStub
    channel: Any
    settings: Settings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def endpoints(self) -> list[rpb.Endpoint]:
        return list((await self.admin.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)).endpoints)

    async def stats(self) -> rpb.GetStatsResponse:
        response: rpb.GetStatsResponse = await self.admin.GetStats(rpb.GetStatsRequest(), timeout=5)
        return response

    async def wait_ready(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` replicas are in the rotation (polling ListEndpoints)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            ready = [e for e in await self.endpoints() if e.state == rpb.ENDPOINT_STATE_READY]
            if len(ready) == count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{count} replicas not ready: {await self.endpoints()}")

    async def stop(self) -> None:
        await self.client.close()
        await self.channel.close(None)
        await self.server.stop(0)
        await self.app.close()


async def start_router(
    addresses: list[str], env: dict[str, str] | None = None, **router: object
) -> RunningRouter:
    env = {
        **(env or {}),
        "LLMOPS_HEALTH_POLL_SECONDS": "0.05",
        "LLMOPS_GRACE_SECONDS": "1",
        "LLMOPS_ROUTER_HTTP_PORT": "0",
        "LLMOPS_ROUTER_ENDPOINTS": ",".join(addresses),
    }
    env.update({f"LLMOPS_ROUTER_{key.upper()}": str(value) for key, value in router.items()})
    settings = Settings.load(env=env)
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    assert isinstance(app, RouterApp)
    address = f"127.0.0.1:{server.port}"
    channel = open_channel(address)
    return RunningRouter(
        server,
        app,
        ServingClient.connect(address, timeout=60),
        rpb_grpc.RouterServiceStub(channel),
        channel,
        settings,
    )


@dataclass
class Fleet:
    """Replicas started by a test, killed when it ends."""

    replicas: list[Replica] = field(default_factory=list)

    async def start(self, count: int = 1, **options: Any) -> list[Replica]:
        started = await asyncio.gather(*(start_replica(**options) for _ in range(count)))
        self.replicas.extend(started)
        return list(started)


@pytest_asyncio.fixture(loop_scope="session")
async def fleet() -> AsyncIterator[Fleet]:
    fleet = Fleet()
    yield fleet
    await asyncio.gather(*(replica.kill() for replica in fleet.replicas))


@pytest_asyncio.fixture(loop_scope="session")
async def make_router() -> AsyncIterator[Callable[..., Awaitable[RunningRouter]]]:
    routers: list[RunningRouter] = []

    async def make(
        addresses: list[str], env: dict[str, str] | None = None, **router: object
    ) -> RunningRouter:
        running = await start_router(addresses, env, **router)
        routers.append(running)
        return running

    yield make
    for running in routers:
        await running.stop()
