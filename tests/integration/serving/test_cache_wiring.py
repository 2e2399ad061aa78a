"""The response cache wired into serving (in process, straight to a real Redis), over the real
transformers engine and the tiny model, loaded as a registry version (``tiny:1``).

Invariant: a deterministic request answered before is answered again from the cache with the same
completions, prompt details and usage (``cached`` set, the engine neither generating nor tokenizing:
the hit is checked with the stored prompt's token count); a stream hit replays
the same content; identical misses at the same time generate once; sampling without a seed and
``CacheControl`` opt-outs skip the cache; a Redis that goes away never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmops.cache.redis_server import RedisServer
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.domain import (
    EngineKind,
    EngineOptions,
    EngineOutput,
    EngineRequest,
    ModelRef,
    ModelSource,
    ResolvedModel,
    ResolvedSource,
)
from llmops.serving.engines.base import Engine
from llmops.serving.resolver import ModelResolver
from tests.integration.serving.conftest import (
    BorrowedEngine,
    Stack,
    serving_settings,
    start_registry_stack,
    stop_stack,
)
from tests.redis_fixture import make_redis_server

__all__ = ["make_redis_server"]

MODEL = "tiny"


class CountingEngine(BorrowedEngine):
    """The shared engine, counting the generations and tokenizations it is asked for."""

    calls = 0
    tokenized = 0

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        CountingEngine.calls += 1
        return super().generate(request)

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        CountingEngine.tokenized += 1
        return await super().tokenize(text, add_special_tokens=add_special_tokens)


class VersionResolver(ModelResolver):
    """Resolves any reference to the tiny model's folder as registry version ``tiny:1``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        return ResolvedSource(path=self.path, model=ResolvedModel(MODEL, 1))

    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        return ResolvedModel(MODEL, 1)


@pytest_asyncio.fixture(loop_scope="session")
async def cached_stack(
    transformers_engine: Engine, tiny_model_path: Path, make_redis_server: Callable[..., RedisServer]
) -> AsyncIterator[tuple[Stack, RedisServer]]:
    redis = make_redis_server()
    settings = serving_settings(
        LLMOPS_REDIS_URL=redis.url,
        LLMOPS_SERVING_HTTP_ENABLED="false",
        LLMOPS_CACHE_REDIS_TIMEOUT_MS="2000",  # a loaded test machine must not time Redis out
    )

    def factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> Engine:
        return CountingEngine(transformers_engine)

    stack = await start_registry_stack(
        settings, factory, VersionResolver(tiny_model_path), served_name=MODEL, ref="tiny:1"
    )
    CountingEngine.calls = 0
    yield stack, redis
    await stop_stack(stack)


def request(text: str, *, stream: bool = False, cache: pb.CacheControl | None = None, **sampling: Any) -> Any:
    kind = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    controls = {"greedy": True, "max_tokens": 8, "ignore_eos": True, **sampling}
    return kind(
        model=pb.ModelSelector(served_name=MODEL),
        prompt=generation_pb2.Prompt(text=text),
        sampling=sampling_pb2.SamplingParams(**controls),
        cache=cache,
    )


def counted(stack: Stack, result: str) -> float:
    value = stack.app.cache.metrics.requests.labels(result)._value.get()
    return float(value)


async def generate(stack: Stack, message: Any) -> pb.GenerateResponse:
    response: pb.GenerateResponse = await stack.client.unary(stack.client.stub.Generate, message)
    return response


async def stream(stack: Stack, message: Any) -> list[pb.GenerateStreamResponse]:
    return [m async for m in stack.client.stream(stack.client.stub.GenerateStream, message)]


def content(messages: list[pb.GenerateStreamResponse]) -> tuple[dict[int, tuple[str, list[int], int]], Any]:
    """The stream's text, tokens and finish reason per completion, and its end message."""
    completions: dict[int, tuple[str, list[int], int]] = {}
    end = None
    for m in messages:
        if m.HasField("end"):
            end = m.end
            continue
        text, tokens, finish = completions.get(m.delta.index, ("", [], 0))
        completions[m.delta.index] = (
            text + m.delta.text_delta,
            tokens + list(m.delta.token_ids),
            m.delta.finish_reason or finish,
        )
    return completions, end


async def test_repeated_greedy_generate_is_a_hit(cached_stack: tuple[Stack, RedisServer]) -> None:
    stack, _ = cached_stack
    first = await generate(stack, request("def add(a, b):"))
    tokenized = CountingEngine.tokenized
    second = await generate(stack, request("def add(a, b):"))
    assert CountingEngine.calls == 1
    assert CountingEngine.tokenized == tokenized, "a hit must not tokenize the prompt again"
    assert not first.cached and second.cached
    assert second.output == first.output and second.output.completions[0].text
    assert second.request_id and second.request_id != first.request_id
    assert second.model.name == MODEL and second.model.version == 1
    assert counted(stack, "hit") == 1 and counted(stack, "miss") == 1


async def test_stream_hit_replays_the_same_content(cached_stack: tuple[Stack, RedisServer]) -> None:
    stack, _ = cached_stack
    original = await stream(stack, request("class Point:", stream=True))
    tokenized = CountingEngine.tokenized
    replay = await stream(stack, request("class Point:", stream=True))
    assert CountingEngine.calls == 1 and CountingEngine.tokenized == tokenized
    assert not any(m.cached for m in original) and all(m.cached for m in replay)
    assert content(replay) == content(original)
    assert replay[-1].HasField("end") and replay[-1].end.usage.completion_tokens == 8
    # A unary request for the same prompt is answered from the stream's stored output.
    unary = await generate(stack, request("class Point:"))
    assert unary.cached and unary.output.completions[0].text == content(original)[0][0][0]


async def test_sampling_without_seed_bypasses(cached_stack: tuple[Stack, RedisServer]) -> None:
    stack, _ = cached_stack
    for _ in range(2):
        response = await generate(stack, request("import os", greedy=False, temperature=1.0))
        assert not response.cached
    assert CountingEngine.calls == 2
    assert counted(stack, "bypass") == 2 and counted(stack, "hit") == 0
    seeded = [
        await generate(stack, request("import os", greedy=False, temperature=1.0, seed=7)) for _ in "ab"
    ]
    assert CountingEngine.calls == 3 and seeded[1].cached and seeded[1].output == seeded[0].output


async def test_cache_control_is_honoured(cached_stack: tuple[Stack, RedisServer]) -> None:
    stack, _ = cached_stack
    no_store = pb.CacheControl(no_store=True)
    await generate(stack, request("x = 1", cache=no_store))
    assert not (await generate(stack, request("x = 1", cache=no_store))).cached
    assert CountingEngine.calls == 2  # nothing was stored
    await generate(stack, request("x = 1"))  # stored now
    bypassed = await generate(stack, request("x = 1", cache=pb.CacheControl(bypass=True)))
    assert not bypassed.cached and CountingEngine.calls == 4
    assert (await generate(stack, request("x = 1", cache=no_store))).cached  # a lookup still
    assert CountingEngine.calls == 4
    streamed = await stream(stack, request("x = 1", stream=True, cache=pb.CacheControl(bypass=True)))
    assert not any(m.cached for m in streamed) and CountingEngine.calls == 5
    assert all(m.cached for m in await stream(stack, request("x = 1", stream=True, cache=no_store)))
    assert CountingEngine.calls == 5


async def test_a_cancelled_stream_is_not_stored(cached_stack: tuple[Stack, RedisServer]) -> None:
    stack, _ = cached_stack
    message = request("def main():", stream=True, max_tokens=24)
    async with contextlib.aclosing(stack.client.stream(stack.client.stub.GenerateStream, message)) as it:
        async for _ in it:
            break  # the client goes away after the first message
    await asyncio.sleep(0.1)
    again = await stream(stack, message)
    assert not any(m.cached for m in again) and CountingEngine.calls == 2
    assert all(m.cached for m in await stream(stack, message)) and CountingEngine.calls == 2


async def test_concurrent_identical_requests_generate_once(cached_stack: tuple[Stack, RedisServer]) -> None:
    stack, _ = cached_stack
    responses = await asyncio.gather(*(generate(stack, request("for i in range(10):")) for _ in range(20)))
    assert CountingEngine.calls == 1
    assert len({r.output.SerializeToString() for r in responses}) == 1
    assert sum(not r.cached for r in responses) == 1


async def test_redis_down_fails_open(cached_stack: tuple[Stack, RedisServer]) -> None:
    stack, redis = cached_stack
    first = await generate(stack, request("while True:"))
    redis.close()
    for stream_it in (False, True, False):
        if stream_it:
            messages = await stream(stack, request("while True:", stream=True))
            assert content(messages)[0][0][0] == first.output.completions[0].text
            assert not any(m.cached for m in messages)
        else:
            response = await generate(stack, request("while True:"))
            assert not response.cached and response.output.completions == first.output.completions
    assert CountingEngine.calls == 4
    assert counted(stack, "error") >= 1


def test_no_redis_url_means_no_cache() -> None:
    from prometheus_client import CollectorRegistry

    from llmops.serving.app import ServingApp

    app = ServingApp(serving_settings(), CollectorRegistry(), resolver=VersionResolver(Path(".")))
    assert app.cache is None and app.service.cache is None


async def test_bad_controls_are_refused_with_the_cache_on(cached_stack: tuple[Stack, RedisServer]) -> None:
    """The lookup comes before tokenizing: a bad request still gets INVALID_ARGUMENT (and leaves no
    single-flight lock behind: the same prompt answers at once afterwards)."""
    stack, _ = cached_stack
    for bad in ({"top_p": 2.0}, {"max_tokens": 10**6}):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.client.stub.Generate(request("def bad():", **bad), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (await generate(stack, request("def bad():"))).cached
    assert (await generate(stack, request("def bad():"))).cached
