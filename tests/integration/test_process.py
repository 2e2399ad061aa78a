"""A service process started the way ``llmops serve`` starts one, stopped the way Kubernetes stops it.

Invariants: port 0 binds a free port and the process prints it; SIGTERM lets an in-flight call
finish inside the grace period, refuses new work and exits cleanly (exit code 0); `llmops serve`
rejects bad settings and unknown services with a message naming the problem.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from llmops.common.process import popen
from tests.integration.probe import SERVICE

REPO = Path(__file__).resolve().parents[2]


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return popen(  # tied: it dies with the test run
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LLMOPS_GRACE_SECONDS": "10", **(env or {})},
    )


async def test_sigterm_drains_in_flight_call_then_exits_cleanly() -> None:
    proc = _spawn("-m", "tests.integration.probe")
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
        match = re.match(r"listening grpc=(\d+) metrics=(\d+)", line)
        assert match, line
        port = int(match.group(1))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(f"/{SERVICE}/Echo")
            assert await echo(b"0", timeout=10) == b"0"
            in_flight = asyncio.ensure_future(echo(b"1.5", timeout=20))
            await asyncio.sleep(0.3)  # let the call reach the handler before the signal
            proc.send_signal(signal.SIGTERM)
            assert await in_flight == b"1.5"
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
        out = proc.stdout.read()  # type: ignore[union-attr]
        assert code == 0, proc.stderr.read()  # type: ignore[union-attr]
        assert "exited cleanly" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_version() -> None:
    from llmops import __version__

    result = subprocess.run(
        [sys.executable, "-m", "llmops.cli", "version"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0
    assert result.stdout.strip() == __version__


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "nonsense"], {}, "unknown service 'nonsense'"),
        (["serve", "registry"], {"LLMOPS_GRACE_SECONDS": "soon"}, "LLMOPS_GRACE_SECONDS"),
        (["serve", "registry"], {"LLMOPS_GRAEC_SECONDS": "1"}, "unknown setting LLMOPS_GRAEC_SECONDS"),
    ],
)
def test_cli_serve_rejects_bad_input(args: list[str], env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmops.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert message in result.stderr
