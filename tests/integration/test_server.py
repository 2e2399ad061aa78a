"""The shared gRPC runtime, through a real server on 127.0.0.1 port 0 with its interceptors.

Invariants: every domain error reaches the client with its own status code and message; anything
unexpected becomes INTERNAL with a generic message (no internal text) and a logged error id;
overload and oversized messages get RESOURCE_EXHAUSTED; health follows readiness; metrics count
calls by code; a stopping server drains in-flight calls and refuses new ones.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmops.common import errors
from llmops.common.server import LLMOpsServer, ServiceBinding, create_server
from llmops.common.settings import Settings
from tests.integration.probe import SERVICE, ProbeApp


def _settings(**overrides: object) -> Settings:
    base = {"grace_seconds": 5.0, "health_poll_seconds": 0.05}
    base.update(overrides)
    return Settings.model_validate(base)


async def _start(app: ProbeApp, **overrides: object) -> tuple[LLMOpsServer, grpc.aio.Channel]:
    server, port = await create_server("127.0.0.1:0", app.bindings(), _settings(**overrides), metrics_port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await asyncio.wait_for(channel.channel_ready(), 10)
    return server, channel


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def probe() -> AsyncIterator[tuple[ProbeApp, LLMOpsServer, grpc.aio.Channel]]:
    app = ProbeApp()
    server, channel = await _start(app)
    yield app, server, channel
    await channel.close()
    await server.stop(0)


def _unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/{method}")


ERROR_CASES = [
    ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT),
    ("NotFound", grpc.StatusCode.NOT_FOUND),
    ("AlreadyExists", grpc.StatusCode.ALREADY_EXISTS),
    ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION),
    ("Aborted", grpc.StatusCode.ABORTED),
    ("OutOfRange", grpc.StatusCode.OUT_OF_RANGE),
    ("Unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
    ("PermissionDenied", grpc.StatusCode.PERMISSION_DENIED),
    ("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("Unavailable", grpc.StatusCode.UNAVAILABLE),
    ("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED),
    ("Cancelled", grpc.StatusCode.CANCELLED),
    ("DataLoss", grpc.StatusCode.DATA_LOSS),
    ("Unimplemented", grpc.StatusCode.UNIMPLEMENTED),
    ("Internal", grpc.StatusCode.INTERNAL),
    ("Abort", grpc.StatusCode.FAILED_PRECONDITION),  # the handler's own context.abort passes through
]


async def test_error_table_covers_every_case() -> None:
    covered = {code for _, code in ERROR_CASES}
    assert set(errors.ERROR_TABLE) <= covered


@pytest.mark.parametrize(("raised", "expected"), ERROR_CASES)
async def test_domain_errors_map_to_their_status(probe, raised: str, expected: grpc.StatusCode) -> None:
    _, _, channel = probe
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _unary(channel, "Raise")(raised.encode(), timeout=10)
    assert info.value.code() == expected
    assert info.value.details() in (f"{raised} raised on purpose", "too busy", "aborted by handler")


async def test_unexpected_error_is_internal_without_leaking(probe, caplog: pytest.LogCaptureFixture) -> None:
    _, _, channel = probe
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as info:
        await _unary(channel, "Raise")(b"ValueError", timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details() or ""
    assert "hunter2" not in details and "Traceback" not in details
    assert details.startswith(errors.GENERIC_INTERNAL_MESSAGE)
    error_id = details.rsplit(" ", 1)[-1].rstrip(")")
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the operator gets the trace, the client does not


async def test_resource_exhausted_carries_retry_delay(probe) -> None:
    _, _, channel = probe
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _unary(channel, "Raise")(b"ResourceExhausted", timeout=10)
    assert errors.retry_delay_from_metadata(info.value.trailing_metadata()) == pytest.approx(2.5)


async def test_invalid_argument_names_the_field(probe) -> None:
    _, _, channel = probe
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _unary(channel, "Raise")(b"InvalidArgumentField", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "max_tokens: must be positive"


async def test_stream_error_after_items_keeps_items_and_status(probe) -> None:
    _, _, channel = probe
    call = channel.unary_stream(f"/{SERVICE}/Stream")(b"3:NotFound", timeout=10)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call:
            received.append(item)
    assert received == [b"0", b"1", b"2"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_oversized_request_is_resource_exhausted() -> None:
    app = ProbeApp()
    server, channel = await _start(app, max_message_bytes=4096)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _unary(channel, "Echo")(b"0" * 10_000, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert app.servicer.calls == 0
    finally:
        await channel.close()
        await server.stop(0)


async def test_concurrency_limit_is_resource_exhausted() -> None:
    app = ProbeApp()
    server, channel = await _start(app, max_concurrent_rpcs=2)
    try:
        echo = _unary(channel, "Echo")
        slow = [asyncio.ensure_future(echo(b"1.0", timeout=10)) for _ in range(2)]
        await _wait_for(lambda: app.servicer.calls == 2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(b"0", timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await asyncio.gather(*slow) == [b"1.0", b"1.0"]
    finally:
        await channel.close()
        await server.stop(0)


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_health_follows_readiness(probe) -> None:
    app, _, channel = probe
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(channel, "") == serving
    assert await _health(channel, SERVICE) == serving
    app.ready = False
    statuses: list[int] = []

    async def poll() -> bool:
        statuses.append(await _health(channel, SERVICE))
        return statuses[-1] == not_serving

    for _ in range(200):
        if await poll():
            break
        await asyncio.sleep(0.02)
    app.ready = True
    assert statuses[-1] == not_serving
    assert await _health(channel, "") == serving  # liveness is unaffected
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _health(channel, "llmops.nope.v1.NopeService")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_metrics_count_calls_by_code() -> None:
    server, channel = await _start(ProbeApp())
    await _unary(channel, "Echo")(b"0", timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await _unary(channel, "Raise")(b"NotFound", timeout=10)
    url = f"http://127.0.0.1:{server.metrics_http_port}/metrics"
    body = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    assert f'llmops_grpc_server_handled_total{{code="OK",method="Echo",service="{SERVICE}"}} 1.0' in body
    assert (
        f'llmops_grpc_server_handled_total{{code="NOT_FOUND",method="Raise",service="{SERVICE}"}} 1.0' in body
    )
    assert f'llmops_grpc_server_handling_seconds_count{{method="Echo",service="{SERVICE}"}} 1.0' in body
    assert f'llmops_grpc_server_in_flight{{method="Echo",service="{SERVICE}"}} 0.0' in body
    await channel.close()
    await server.stop(0)


async def test_stop_drains_in_flight_and_refuses_new_calls() -> None:
    app = ProbeApp()
    server, channel = await _start(app)
    echo = _unary(channel, "Echo")
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
    )
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    in_flight = asyncio.ensure_future(echo(b"0.5", timeout=10))
    await _wait_for(lambda: app.servicer.calls == 1)
    stopping = asyncio.ensure_future(server.stop(5))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING  # endpoints drop it
    watch.cancel()
    assert await in_flight == b"0.5"  # finished inside the grace period
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await echo(b"0", timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()


@pytest.mark.timeout(60)
async def test_stop_never_hangs_on_a_readiness_check_in_flight() -> None:
    # A readiness check that hops to a thread (as a store ping does) finishing just as stop()
    # cancels the poller used to swallow the cancellation (Python 3.11's wait_for) and hang stop().
    async def ready() -> bool:
        return await asyncio.to_thread(lambda: True)

    settings = _settings(health_poll_seconds=0.001, grace_seconds=0.0)
    binding = ServiceBinding("llmops.test.v1.Readiness", None, lambda servicer, server: None, readiness=ready)
    for i in range(100):
        server, _ = await create_server("127.0.0.1:0", [binding], settings)
        await asyncio.sleep(0.005 + (i % 7) * 0.001)
        await asyncio.wait_for(server.stop(0), 5)


async def test_watch_streams_end_when_the_work_is_done_not_at_the_grace() -> None:
    # A router keeps a health Watch (and serving's WatchLoad) open on every replica. Those streams
    # never end by themselves: stop(grace) used to wait the whole grace for them, so every pod
    # with a router attached took its full termination grace to exit.
    app = ProbeApp()
    server, channel = await _start(app)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    in_flight = asyncio.ensure_future(_unary(channel, "Echo")(b"0.5", timeout=10))
    await _wait_for(lambda: app.servicer.calls == 1)
    stopping = asyncio.ensure_future(server.stop(300))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING  # seen while draining
    assert await in_flight == b"0.5"  # the work still gets its grace
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(watch.read(), 60)  # a TimeoutError here: the watch held the drain
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.wait_for(stopping, 60)  # not the 300 s grace: nothing but the watch was left
    await channel.close()
