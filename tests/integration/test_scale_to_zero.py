"""Scale to zero in the embedded stack: a real router, a real serving replica (tiny model,
transformers engine), the stack's scaler.

Invariants: a replica with no traffic for the idle time is stopped (its process ends, drained by
SIGTERM); a request for its model then waits in the router and is answered once the scaler has
started the replica again (same address; the router finds it back), within its deadline; a request
whose deadline passes first gets DEADLINE_EXCEEDED from the router; the restarted replica observes
each cold-start phase exactly once for its one load (first token at the held request); ``down``
stops everything, the restarted replica included.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest

from llmops.common import metric_names as names
from llmops.common.clients import ServingClient
from llmops.common.errors import DeadlineExceeded
from llmops.common.tiny_model import build_tiny_model
from llmops.stack.stack import LocalStack, StackOptions, alive, read_state
from tests.conftest import require_tool

pytestmark = [pytest.mark.slow]
IDLE_SECONDS = 3.0


def sample(url: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` on a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def wait_until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.2)


async def test_idle_replica_scales_to_zero_and_a_held_request_brings_it_back(tmp_path: Path) -> None:
    require_tool("redis-server")
    options = StackOptions(
        data_dir=tmp_path / "stack",
        env={
            "LLMOPS_SERVING_ENGINE": "transformers",
            "LLMOPS_SERVING_MODEL": str(build_tiny_model().path),
            "LLMOPS_SERVING_SERVED_NAME": "tiny",
        },
        services=("serving",),
        prometheus=False,
        mlflow_ui=False,
        grace_seconds=20,
        scale_to_zero_after=IDLE_SECONDS,
    )
    stack = LocalStack(options)
    state = await asyncio.to_thread(stack.up)
    pids = [p.pid for p in state.parts]
    try:
        assert [p.name for p in state.parts] == ["redis", "serving", "router", "scaler"]
        router, serving, scaler = (state.part(n) for n in ("router", "serving", "scaler"))
        assert router is not None and serving is not None and scaler is not None
        first_pid = serving.pid
        async with ServingClient.connect(router.address, timeout=120) as client:
            # held by the router until the start-up model is READY
            assert await client.generate_text("tiny", "hello", max_tokens=2, greedy=True, timeout=120)

            await wait_until(lambda: not alive(first_pid), 90, "the idle replica stopped")
            assert "idle for" in await asyncio.to_thread(Path(scaler.log).read_text)

            # at zero: both requests wait in the router and wake the scaler; the short one's deadline
            # passes before a replica can start, the long one is answered by the restarted replica
            started = time.monotonic()
            short = asyncio.create_task(
                client.generate_text("tiny", "hi", max_tokens=2, greedy=True, timeout=0.8)
            )
            long = asyncio.create_task(
                client.generate_text("tiny", "hello again", max_tokens=2, greedy=True, timeout=150)
            )
            with pytest.raises(DeadlineExceeded, match="no replica of tiny"):
                await short
            assert await long
            print(f"held through a scale from zero: answered after {time.monotonic() - started:.1f} s")

        recorded = read_state(options.data_dir)
        assert recorded is not None
        restarted = recorded.part("serving")
        assert restarted is not None and restarted.pid != first_pid and alive(restarted.pid)
        pids.append(restarted.pid)
        assert restarted.address == serving.address  # the same address: the router's static list
        # the restarted process made one load; the held request was its first
        for phase in names.COLD_START_PHASES:
            count = sample(
                serving.metrics, names.SERVING_COLD_START_SECONDS + "_count", model="tiny", phase=phase
            )
            assert count == 1, phase
        assert sample(router.metrics, names.ROUTER_HOLD_SECONDS + "_count", model="tiny") >= 2
        assert (
            sample(router.metrics, names.ROUTER_REQUESTS_TOTAL, model="tiny", code="DEADLINE_EXCEEDED") == 1
        )
        assert sample(router.metrics, names.ROUTER_PENDING_REQUESTS, model="tiny") == 0
    finally:
        await asyncio.to_thread(stack.down)
    await wait_until(lambda: not any(alive(pid) for pid in pids), 60, "every part stopped")
