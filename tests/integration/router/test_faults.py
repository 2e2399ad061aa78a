"""Replica faults seen through the router, on real replica processes.

Invariants: a replica that dies before its first answer costs the caller nothing (the request is
retried on another and succeeds); one that dies after a stream started ends that stream with
UNAVAILABLE (never a silent truncation, never a replay on another replica); a replica that stops
reporting (stuck) or whose model is no longer ready leaves the rotation, and comes back when it
recovers; with no ready replica requests are held, counted in llmops_router_pending_requests, served
when a replica appears, and fail with DEADLINE_EXCEEDED when their deadline passes first.
"""

from __future__ import annotations

import asyncio
import signal
import socket

import grpc
import httpx

from llmops.common.clients import ServingClient
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.router.v1 import router_service_pb2 as rpb
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from tests.integration.router.conftest import Fleet, RunningRouter, poll_until, start_replica


def generate(prompt: str, max_tokens: int = 4) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=pb.ModelSelector(served_name="tiny"),
        prompt=generation_pb2.Prompt(text=prompt),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def stream(prompt: str, max_tokens: int) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model=pb.ModelSelector(served_name="tiny"),
        prompt=generation_pb2.Prompt(text=prompt),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


async def states(router: RunningRouter) -> dict[str, int]:
    return {e.address: e.state for e in await router.endpoints()}


async def wait_state(router: RunningRouter, address: str, state: int) -> float:
    async def reached() -> bool:
        return (await states(router)).get(address) == state

    return await poll_until(reached, what=f"{address} in state {state}")


async def test_a_replica_dying_before_its_first_answer_is_retried_elsewhere(
    fleet: Fleet, make_router
) -> None:
    frozen, healthy = await fleet.start(2)
    # stale_ms long: the frozen replica stays in the rotation, so requests reach it and hang there
    router = await make_router([frozen.address, healthy.address], policy="round_robin", stale_ms=20_000)
    await router.wait_ready(2)
    frozen.signal(signal.SIGSTOP)
    calls = [
        asyncio.create_task(router.client.unary(router.client.stub.Generate, generate(f"q{i}"), timeout=30))
        for i in range(4)
    ]

    async def two_hang_there() -> bool:
        return sum(e.in_flight for e in await router.endpoints() if e.address == frozen.address) == 2

    await poll_until(two_hang_there, what="two requests in flight on the frozen replica")
    await frozen.kill()
    answers = await asyncio.gather(*calls)
    assert all(a.output.completions[0].text for a in answers)
    stats = await router.stats()
    assert stats.retries == 2
    endpoints = {e.address: e for e in await router.endpoints()}
    assert endpoints[healthy.address].requests == 4
    assert endpoints[frozen.address].state == rpb.ENDPOINT_STATE_DOWN


async def test_a_replica_dying_mid_stream_ends_the_stream_unavailable(fleet: Fleet, make_router) -> None:
    replicas = await fleet.start(2, step_delay=0.05)
    router = await make_router([r.address for r in replicas], policy="round_robin")
    await router.wait_ready(2)
    deltas = 0
    call = router.client.stub.GenerateStream(stream("tell me a long story", 200), timeout=60)
    try:
        async for message in call:
            if message.HasField("delta") and deltas == 0:
                serving = next(e.address for e in await router.endpoints() if e.in_flight == 1)
                victim = next(r for r in replicas if r.address == serving)
                await victim.kill()
            deltas += 1
        raise AssertionError("the stream ended normally although its replica died")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        assert "failed after the stream started" in (exc.details() or "")
    assert deltas >= 1
    other = next(e for e in await router.endpoints() if e.address != serving)
    assert other.requests == 0  # never replayed elsewhere


async def test_stuck_or_unready_replicas_leave_the_rotation_and_come_back(fleet: Fleet, make_router) -> None:
    a, b = await fleet.start(2)
    router = await make_router([a.address, b.address], policy="round_robin", stale_ms=500)
    await router.wait_ready(2)

    a.signal(signal.SIGSTOP)  # stuck: its load reports stop
    left_after = await wait_state(router, a.address, rpb.ENDPOINT_STATE_DOWN)
    print(f"stuck replica left the rotation after {left_after * 1000:.0f} ms (stale_ms=500)")
    for i in range(6):
        await router.client.unary(router.client.stub.Generate, generate(f"s{i}"), timeout=10)
    a.signal(signal.SIGCONT)
    await wait_state(router, a.address, rpb.ENDPOINT_STATE_READY)

    # not ready: its model unloaded (readiness is a READY model), pushed by its next load report
    async with ServingClient.connect(b.address) as direct:
        await direct.unary(
            direct.stub.UnloadModel, pb.UnloadModelRequest(model=pb.ModelSelector(served_name="tiny"))
        )

    async def unready() -> bool:
        return not any(m.ready for e in await router.endpoints() if e.address == b.address for m in e.models)

    await poll_until(unready, what="the unloaded model out of the rotation")
    before = {e.address: e.requests for e in await router.endpoints()}
    for i in range(6):
        await router.client.unary(router.client.stub.Generate, generate(f"u{i}"), timeout=10)
    after = {e.address: e.requests for e in await router.endpoints()}
    assert after[b.address] == before[b.address] and after[a.address] == before[a.address] + 6


async def test_no_ready_replica_holds_requests_until_one_appears_or_the_deadline(
    make_router, fleet: Fleet
) -> None:
    with socket.socket() as s:  # a port nothing listens on yet: the replica that will come
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    router = await make_router([f"127.0.0.1:{port}"])
    try:
        await router.client.stub.Generate(generate("late"), timeout=1.0)
        raise AssertionError("answered with no replica")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the router answered (just before the deadline), not the client's own timer
        assert "became ready before the deadline" in (exc.details() or ""), exc.details()

    held = asyncio.create_task(
        router.client.unary(router.client.stub.Generate, generate("held"), timeout=120)
    )
    metrics_url = f"http://127.0.0.1:{router.server.metrics_http_port}/metrics"
    async with httpx.AsyncClient() as http:

        async def counted() -> bool:
            return 'llmops_router_pending_requests{model="tiny"} 1.0' in (await http.get(metrics_url)).text

        await poll_until(counted, what="the held request in llmops_router_pending_requests")
    assert (await router.stats()).pending == 1
    replica = await start_replica(port=port)
    fleet.replicas.append(replica)
    answer = await held
    assert answer.output.completions[0].text
    stats = await router.stats()
    assert stats.pending == 0 and stats.held == 2
    async with httpx.AsyncClient() as http:
        assert 'llmops_router_pending_requests{model="tiny"} 0.0' in (await http.get(metrics_url)).text
