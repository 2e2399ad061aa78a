"""SIGTERM to ``llmops serve serving`` while many streams run: every client gets an ending, in time.

Invariants: with streams in flight (some short enough to finish within the grace period, some far
too long to), SIGTERM first turns health NOT_SERVING (seen on a Health.Watch opened before), then
each stream either ends normally (every token, then its end message, status OK) or ends with
UNAVAILABLE — never another status, never a truncated stream reported as OK; a call arriving
during the drain is refused with UNAVAILABLE; no client waits past the grace period plus a margin;
and the process exits 0.

The grace period and the margin (the process's own shutdown after it) are measured, not fixed:
both scale with how long one short generation of the tiny model takes on this machine (measured in
this process before the server starts, and in the server just before the signal), so a busy 2-core
machine makes them wider instead of failing the test; the long streams stay far too long to finish.

The serving process is the real one (the CLI, the transformers engine, the tiny model): draining
is what is under test and it lives in the process's signal handling and gRPC server. One stream
drained to its end by SIGTERM is ``tests/integration/serving/test_sigterm.py``; this adds many
streams, ones that cannot finish, the deadline on every client and the health ordering.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmops.common.clients import ServingClient
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from tests.faults.ledger import FaultCounts, record
from tests.integration.serving.conftest import serving_process

pytestmark = [pytest.mark.faults, pytest.mark.slow]

GRACE = 5.0  # the least grace period; more when a short generation takes long (see grace_for)
MARGIN = 6.0  # the least margin; more when a short generation takes long (see shutdown_margin)
SHORT, LONG = 16, 1000  # tokens: short streams finish within the grace period, long ones cannot
STREAMS = [SHORT, SHORT, SHORT, LONG, LONG, LONG]  # one at a time on this engine, in this order


def short_generation_seconds(model_path: Path) -> float:
    """How long the tiny model takes for a short stream's tokens here and now (greedy, after a warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    prompt = torch.tensor([[1, 2, 3, 4]])
    took = []
    for _ in range(2):
        began = time.monotonic()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=SHORT, min_new_tokens=SHORT, do_sample=False)
        took.append(time.monotonic() - began)
    return took[-1]


def grace_for(short: float) -> float:
    """A grace period that one short stream, begun before the signal, finishes within many times
    over; never under ``GRACE``. A long stream (60 times longer) cannot."""
    return max(GRACE, 8 * short)


@pytest_asyncio.fixture(loop_scope="session")
async def serving_under_test(
    tiny_model_path: Path, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, float]]:
    grace = grace_for(await asyncio.to_thread(short_generation_seconds, tiny_model_path))
    async with serving_process(
        tiny_model_path, tmp_path, grace=grace, LLMOPS_SERVING_HTTP_ENABLED="false"
    ) as (process, address):
        yield process, address, grace


def stream_request(max_tokens: int) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model=pb.ModelSelector(served_name="tiny"),
        prompt=generation_pb2.Prompt(text="import os\n"),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, greedy=True),
    )


def shutdown_margin(short_call: float) -> float:
    """Time the process may take past the grace period (cancel, stop the server, close the engine,
    exit): 20 short generations' worth as measured now, and never under ``MARGIN``."""
    return max(MARGIN, 20 * short_call)


def stream_unary(max_tokens: int) -> pb.GenerateRequest:
    """The streams' prompt as one unary call."""
    return pb.GenerateRequest(model=pb.ModelSelector(served_name="tiny"), prompt=stream_request(max_tokens).prompt,
                              sampling=stream_request(max_tokens).sampling)  # fmt: skip


class Stream:
    """One client's stream: what it received and how it ended."""

    def __init__(self, client: ServingClient, max_tokens: int, deadline: float) -> None:
        self.max_tokens = max_tokens
        self.call = client.stub.GenerateStream(stream_request(max_tokens), timeout=deadline)
        self.tokens = 0
        self.end: pb.GenerateStreamResponse | None = None
        self.first = asyncio.Event()
        self.ended_at = 0.0

    async def read(self) -> None:
        try:
            async for message in self.call:
                if message.WhichOneof("event") == "delta":
                    self.tokens += len(message.delta.token_ids)
                    self.first.set()
                else:
                    self.end = message
        finally:
            self.ended_at = time.monotonic()
            self.first.set()

    def problem(self) -> str | None:
        """What is wrong with a stream that ended OK (``None``: it is whole)."""
        if self.end is None or self.end.end.usage.completion_tokens != self.max_tokens:
            return f"ended OK without its end message after {self.tokens}/{self.max_tokens} tokens"
        if self.tokens != self.max_tokens:
            return f"{self.tokens} tokens, expected {self.max_tokens}"
        return None


async def watch_health(
    channel: grpc.aio.Channel, seen: list[tuple[float, int]], first: asyncio.Event
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=ServingClient.service_name)
    try:
        async for response in stub.Watch(request):
            seen.append((time.monotonic(), response.status))
            first.set()
    except grpc.aio.AioRpcError:
        pass  # the server went away: the watch ends


async def test_sigterm_mid_stream_ends_every_stream_in_time(
    serving_under_test: tuple[asyncio.subprocess.Process, str, float],
) -> None:
    process, address, grace = serving_under_test
    counts: FaultCounts = record("serving-sigterm")
    async with ServingClient.connect(address, timeout=30) as client:
        await client.wait_ready(timeout=60, interval=0.05)
        sent = time.monotonic()  # the machine's pace now: one short generation
        await client.unary(client.stub.Generate, stream_unary(SHORT), timeout=60)
        margin = shutdown_margin(time.monotonic() - sent)
        health: list[tuple[float, int]] = []
        watching = asyncio.Event()
        watcher = asyncio.create_task(watch_health(client.channel, health, watching))
        await asyncio.wait_for(watching.wait(), margin)  # the watch has answered (SERVING) before all else
        # Far past the bound below (the first token, then the grace period and the margin after it).
        deadline = 2 * (grace + 2 * margin)
        streams = [Stream(client, n, deadline) for n in STREAMS]
        readers = [asyncio.create_task(s.read()) for s in streams]
        await asyncio.wait_for(
            streams[0].first.wait(), margin
        )  # generation has begun; the rest wait their turn
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        counts.injected += 1

        async def ending(stream: Stream, reader: asyncio.Task[None]) -> Stream:
            await reader
            return stream

        # A call that arrives while the server drains is refused at once, not queued or left hanging.
        while not any(status == health_pb2.HealthCheckResponse.NOT_SERVING for _, status in health):
            assert time.monotonic() - signalled < margin, "health never turned NOT_SERVING"
            await asyncio.sleep(0.01)
        refused = partial(client.unary, client.stub.Generate, stream_unary(1), timeout=margin)
        await counts.call(refused, bound=margin, allowed=(grpc.StatusCode.UNAVAILABLE,))
        assert counts.codes == {"UNAVAILABLE": 1}, counts.line()

        for stream, reader in zip(streams, readers, strict=True):
            await counts.call(
                partial(ending, stream, reader),
                bound=max(0.1, signalled + grace + margin - time.monotonic()),  # from the signal on
                allowed=(grpc.StatusCode.UNAVAILABLE,),
                check=Stream.problem,
            )
        counts.seconds = time.monotonic() - signalled
        exit_code = await asyncio.wait_for(process.wait(), margin)
        watcher.cancel()

    counts.note = (
        "tokens="
        + ",".join(f"{s.tokens}/{s.max_tokens}" for s in streams)
        + f" grace={grace:.1f}s margin={margin:.1f}s"
    )
    counts.assert_nothing_lost()
    assert exit_code == 0
    finished = [s for s in streams if s.end is not None]
    assert any(s.max_tokens == SHORT for s in finished), "no short stream finished within the grace period"
    assert counts.allowed >= 2, "no stream was cut off: the long ones should outlast the grace period"
    latest = max(s.ended_at for s in streams) - signalled
    assert latest < grace + margin, (
        f"the last stream ended {latest:.1f}s after SIGTERM (margin {margin:.1f}s)"
    )
    not_serving = [t for t, status in health if status == health_pb2.HealthCheckResponse.NOT_SERVING]
    assert health[0][1] == health_pb2.HealthCheckResponse.SERVING and not_serving, health
    cut = [s.ended_at for s in streams if s.end is None]
    assert not_serving[0] <= min(cut), "health turned NOT_SERVING only after streams were cut"
