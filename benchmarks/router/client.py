"""The open-loop load generator: sends a schedule's requests at their times over gRPC streams.

Requests leave at their scheduled times whether or not earlier ones have finished (open loop, as
users arrive), so a slow arm queues instead of slowing the offered load. Each request records its
time to the first token, its duration, the tokens received and its status (OK or a gRPC code).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks.router.workloads import Request, Schedule


@dataclass(frozen=True)
class Outcome:
    """What one request got."""

    index: int
    group: int
    sent_at: float  # seconds after the run's start, as sent (>= scheduled)
    ttft: float  # seconds; NaN when no token came
    duration: float
    tokens: int
    status: str  # "OK" or the gRPC status name


def stream_request(model: str, prompt: str, max_tokens: int) -> Any:
    from llmops.proto.common.v1 import generation_pb2, sampling_pb2
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    return pb.GenerateStreamRequest(
        model=pb.ModelSelector(served_name=model),
        prompt=generation_pb2.Prompt(text=prompt),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, greedy=True),
    )


async def one(
    stub: Any,
    model: str,
    request: Request,
    max_tokens: int,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 120.0,
    started: float = 0.0,
) -> Outcome:
    """Send one streamed request and time it."""
    message = stream_request(model, request.prompt, max_tokens)
    begin = time.perf_counter()
    first: float | None = None
    tokens = 0
    status = "OK"
    try:
        async for reply in stub.GenerateStream(message, timeout=timeout, metadata=tuple(metadata)):
            if reply.WhichOneof("event") != "delta" or not reply.delta.token_ids:
                continue
            if first is None:
                first = time.perf_counter()
            tokens += len(reply.delta.token_ids)
    except grpc.aio.AioRpcError as exc:
        status = exc.code().name
    end = time.perf_counter()
    return Outcome(
        index=request.index,
        group=request.group,
        sent_at=begin - started,
        ttft=(first - begin) if first is not None else float("nan"),
        duration=end - begin,
        tokens=tokens,
        status=status if status != "OK" or tokens else "EMPTY",
    )


async def run_schedule(
    address: str,
    model: str,
    schedule: Schedule,
    max_tokens: int,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    session_header: str = "",
    timeout: float = 120.0,
) -> tuple[float, list[Outcome]]:
    """Send every request of ``schedule`` at its time; (wall seconds, outcomes in index order).

    With ``session_header`` each request also carries its group as a session id.
    """
    from llmops.proto.serving.v1 import serving_service_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = serving_service_pb2_grpc.ServingServiceStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()

        async def at_time(request: Request) -> Outcome:
            delay = start + request.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            headers = list(metadata)
            if session_header:
                headers.append((session_header, f"user-{request.group}"))
            return await one(
                stub, model, request, max_tokens, metadata=headers, timeout=timeout, started=start
            )

        outcomes = await asyncio.gather(*(at_time(r) for r in schedule.requests))
        return time.perf_counter() - start, sorted(outcomes, key=lambda o: o.index)


async def closed_loop(
    address: str,
    model: str,
    prompts: Sequence[str],
    concurrency: int,
    max_tokens: int,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 120.0,
) -> tuple[float, list[Outcome]]:
    """``concurrency`` requests in flight until every prompt is sent (for overhead measurements)."""
    from llmops.proto.serving.v1 import serving_service_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = serving_service_pb2_grpc.ServingServiceStub(channel)
        await channel.channel_ready()
        semaphore = asyncio.Semaphore(concurrency)
        start = time.perf_counter()

        async def bounded(i: int, prompt: str) -> Outcome:
            async with semaphore:
                request = Request(i, 0.0, prompt, -1)
                return await one(
                    stub, model, request, max_tokens, metadata=metadata, timeout=timeout, started=start
                )

        outcomes = await asyncio.gather(*(bounded(i, p) for i, p in enumerate(prompts)))
        return time.perf_counter() - start, list(outcomes)
