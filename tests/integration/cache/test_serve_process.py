"""``llmops serve cache`` as a process: it binds the port it prints, answers through Redis, and
drains and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from llmops.cache.redis_server import RedisServer
from llmops.common.clients import CacheClient
from llmops.common.process import popen
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import generation_pb2
from tests.integration.cache.conftest import unique_model

REPO = Path(__file__).resolve().parents[3]


def _spawn(env: dict[str, str]) -> subprocess.Popen[str]:
    command = [
        "-m",
        "llmops.cli",
        "serve",
        "cache",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--host",
        "127.0.0.1",
    ]
    return popen(  # tied: it dies with the test run
        [sys.executable, *command],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


async def test_serve_cache_process(redis_server: RedisServer) -> None:
    env = {**os.environ, "LLMOPS_REDIS_URL": redis_server.url, "LLMOPS_GRACE_SECONDS": "2"}
    proc = _spawn(env)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
        match = re.search(r"llmops cache listening grpc=(\d+)", line)
        assert match, line
        async with CacheClient.connect(f"127.0.0.1:{match.group(1)}", timeout=10) as client:
            await client.wait_ready(timeout=30, interval=0.05)
            key = pb.CacheKey(
                model={"name": unique_model(), "version": 1},
                prompt=generation_pb2.Prompt(text="q"),
                sampling={"seed": 1},
            )
            looked = await client.unary(client.stub.Lookup, pb.LookupRequest(key=key))
            assert looked.outcome == pb.CACHE_OUTCOME_MISS
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 30) == 0, proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
