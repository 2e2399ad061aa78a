"""Load handling through a real gRPC server, on the fake engine (each step takes a few milliseconds).

Invariants: readiness is SERVING only while a model is loaded; a full queue answers
RESOURCE_EXHAUSTED with a retry delay; a cancelled stream frees its engine slot at once; a deadline
ends the call with DEADLINE_EXCEEDED and frees the slot; unloading with in-flight streams ends them
with finish reason ABORT.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2

from llmops.common.errors import retry_delay_from_metadata
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.domain import EngineKind, EngineOptions
from llmops.serving.engines.fake import FakeEngine
from tests.integration.serving.conftest import Stack, serving_settings, start_stack, stop_stack

SELECTOR = pb.ModelSelector(served_name="fake")


class Fakes:
    def __init__(self) -> None:
        self.engines: list[FakeEngine] = []

    def __call__(self, kind: EngineKind, path: Path, name: str, options: EngineOptions) -> FakeEngine:
        self.engines.append(FakeEngine(path, name, options, step_delay=0.01, max_concurrency=1, context=4096))
        return self.engines[-1]


@pytest_asyncio.fixture(loop_scope="session")
async def fake_stack(tiny_model_path: Path) -> AsyncIterator[tuple[Stack, Fakes]]:
    fakes = Fakes()
    stack = await start_stack(
        fakes, serving_settings(LLMOPS_SERVING_MAX_WAITING="1", LLMOPS_SERVING_HTTP_ENABLED="false")
    )
    yield stack, fakes
    await stop_stack(stack)


async def load(stack: Stack, tiny_model_path: Path) -> None:
    request = pb.LoadModelRequest(local_path=str(tiny_model_path), served_name="fake")
    await stack.client.unary(stack.client.stub.LoadModel, request)


def generate(max_tokens: int, stream: bool = False) -> object:
    kind = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    return kind(
        model=SELECTOR,
        prompt=generation_pb2.Prompt(text="x"),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_readiness_follows_the_loaded_model(fake_stack, tiny_model_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, _ = fake_stack
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert await stack.client.health() == not_serving
    assert await stack.client.health("") == serving  # alive, just not ready
    await load(stack, tiny_model_path)
    await stack.client.wait_ready(timeout=10)
    await stack.client.unary(stack.client.stub.UnloadModel, pb.UnloadModelRequest(model=SELECTOR))
    for _ in range(200):
        if await stack.client.health() == not_serving:
            break
        await asyncio.sleep(0.02)
    assert await stack.client.health() == not_serving


async def test_full_queue_is_resource_exhausted_with_retry_delay(fake_stack, tiny_model_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, fakes = fake_stack
    await load(stack, tiny_model_path)
    stub = stack.client.stub
    running = stub.Generate(generate(100), timeout=30)
    await until(lambda: fakes.engines[0].running == 1)
    waiting = stub.Generate(generate(2), timeout=30)
    await until(lambda: stack.app.service.waiting("fake") == 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate(2), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay_from_metadata(info.value.trailing_metadata()) == pytest.approx(1.0)
    assert len((await running).output.completions[0].token_ids) == 100
    assert len((await waiting).output.completions[0].token_ids) == 2


async def test_cancelled_stream_frees_its_slot(fake_stack, tiny_model_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, fakes = fake_stack
    await load(stack, tiny_model_path)
    call = stack.client.stub.GenerateStream(generate(3000, stream=True), timeout=30)
    assert (await call.read()).WhichOneof("event") == "delta"
    call.cancel()
    await until(lambda: fakes.engines[0].running == 0)
    assert fakes.engines[0].aborted == 1
    # The single slot is free: a new request runs at once instead of waiting behind the old one.
    response = await stack.client.stub.Generate(generate(2), timeout=5)
    assert len(response.output.completions[0].token_ids) == 2


async def test_deadline_is_honoured_and_frees_the_slot(fake_stack, tiny_model_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, fakes = fake_stack
    await load(stack, tiny_model_path)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for stream in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            call = stack.client.stub.GenerateStream(generate(3000, True), timeout=0.3) if stream else None
            if call is not None:
                async for _ in call:
                    pass
            else:
                await stack.client.stub.Generate(generate(3000), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - started < 5
    await until(lambda: fakes.engines[0].running == 0)
    assert stack.app.service.waiting("fake") == 0


async def test_unload_aborts_in_flight_streams(fake_stack, tiny_model_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, _ = fake_stack
    await load(stack, tiny_model_path)
    call = stack.client.stub.GenerateStream(generate(3000, stream=True), timeout=30)
    assert (await call.read()).WhichOneof("event") == "delta"
    unload = pb.UnloadModelRequest(model=SELECTOR, drain_timeout=duration_pb2.Duration(nanos=50_000_000))
    result = await stack.client.unary(stack.client.stub.UnloadModel, unload)
    assert result.aborted_requests == 1 and result.served_name == "fake"
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    finishes = [
        m.delta.finish_reason for m in messages if m.WhichOneof("event") == "delta" and m.delta.finish_reason
    ]
    assert finishes == [generation_pb2.FINISH_REASON_ABORT]
    assert messages[-1].WhichOneof("event") == "end"
    listed = await stack.client.unary(stack.client.stub.ListModels, pb.ListModelsRequest())
    assert list(listed.models) == []
