"""Cache benchmark (`python -m benchmarks.cache.run`): what a cache hit costs, against a plain gRPC call.

Against a redis-server started here, in one run:

  plain echo     a unary call to a bare grpc.aio echo server (no interceptors, no work): the floor of
                 any gRPC hop in Python on this machine, what the goal is a ratio to.
  raw GET        redis.asyncio GET of a stored entry: one Redis round trip.
  in-process     ``ResponseCache.lookup`` + key hashing + proto decode, as serving calls it.
  cache gRPC     ``CacheService.Lookup`` from a client (the server hashes, looks up, answers).
  serving hit    Generate through serving's gRPC server (tiny model on transformers, registry
                 version ``tiny:1``), answered from the response cache in Redis.
  serving miss   the same with a fresh prompt each call: what a user pays without the cache.

Every round measures every path in a rotated order (so background load hits all alike); each
path's p50 and p99 are the medians of its per-round percentiles. Goal: a serving hit at most 1.5x
the plain echo at p50 and at p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from benchmarks.gate import Goal, alternating, finish, median, percentile, quick_default
from benchmarks.grpc_runtime import SERVICE as ECHO
from benchmarks.grpc_runtime import plain_server
from llmops.cache.app import build_app
from llmops.cache.redis_server import RedisServer
from llmops.common.app import start_app
from llmops.common.clients import CacheClient
from llmops.common.response_cache import keys
from llmops.common.response_cache.build import build_response_cache
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.response_cache.codec import GeneratedOutputCodec
from llmops.common.response_cache.domain import Prompt, ResolvedModel, SamplingParams
from llmops.common.server import create_server
from llmops.common.settings import Settings
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2, usage_pb2

PROMPT = "Write a haiku about caches and the cost of a round trip."
MODEL = ResolvedModel("tiny", 1, "champion")
CODEC = GeneratedOutputCodec()
MISS_TOKENS = 16  # tokens per serving request (hit and miss alike)
MISS_CALLS = 30  # serving-miss calls in all, spread over the rounds: each one runs the model
GOAL = 1.5  # a serving hit / the plain echo, at p50 and at p99

Call = Callable[[], Awaitable[Any]]


def answer(tokens: int = 128) -> generation_pb2.GeneratedOutput:
    return generation_pb2.GeneratedOutput(
        completions=[
            generation_pb2.Completion(
                index=0,
                text=" word" * tokens,
                token_ids=list(range(1000, 1000 + tokens)),
                finish_reason=generation_pb2.FINISH_REASON_LENGTH,
            )
        ],
        prompt_token_ids=list(range(1, 17)),
        usage=usage_pb2.Usage(prompt_tokens=16, completion_tokens=tokens, total_tokens=16 + tokens),
    )


def proto_key() -> pb.CacheKey:
    return pb.CacheKey(
        model=model_pb2.ResolvedModel(name=MODEL.name, version=MODEL.version, alias=MODEL.alias),
        prompt=generation_pb2.Prompt(text=PROMPT),
        sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=128),
    )


def in_process_lookup(cache: ResponseCache) -> Call:
    sampling = SamplingParams(greedy=True, max_tokens=128)

    async def call() -> generation_pb2.GeneratedOutput:
        key = keys.make_key(MODEL, Prompt(text=PROMPT), sampling)  # serving hashes per request
        found = await cache.lookup(key)
        assert found.entry is not None, "expected a hit"
        return CODEC.decode(found.entry.payload)

    return call


async def sequential(call: Call, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return latencies


async def serving_paths(settings: Settings, cleanup: contextlib.AsyncExitStack) -> dict[str, Call]:
    """Serving's own hit and miss paths: Generate through serving's gRPC server, with the tiny model
    on the transformers engine loaded as ``tiny:1`` and the response cache on ``settings``' Redis.

    ``serving hit`` repeats one greedy request (answered from the cache after the first call);
    ``serving miss`` sends a fresh prompt each call, so the engine generates.
    """
    from llmops.common.clients import ServingClient
    from llmops.common.tiny_model import build_tiny_model
    from llmops.proto.serving.v1 import serving_service_pb2 as spb
    from llmops.serving.app import ServingApp
    from llmops.serving.domain import EngineKind, LoadRequest, ModelRef, ModelSource, ResolvedSource
    from llmops.serving.domain import ResolvedModel as ServingModel
    from llmops.serving.resolver import ModelResolver

    class VersionResolver(ModelResolver):
        """Any reference resolves to the tiny model's folder as registry version ``tiny:1``: serving
        caches only resolved registry versions, never a model loaded from a local folder."""

        def __init__(self, path: Path) -> None:
            self.path = path

        async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
            return ResolvedSource(path=self.path, model=ServingModel(MODEL.name, MODEL.version))

        async def resolve_ref(self, ref: ModelRef) -> ServingModel:
            return ServingModel(MODEL.name, MODEL.version)

    path = build_tiny_model().path
    registry = CollectorRegistry()
    app = ServingApp(settings, registry, resolver=VersionResolver(path))
    cleanup.push_async_callback(app.close)
    server, port = await create_server("127.0.0.1:0", app.bindings(), settings, registry=registry)
    cleanup.push_async_callback(server.stop, 0)
    await app.start()
    await app.service.load_model(
        LoadRequest(
            source=ModelSource(model_ref=ModelRef.parse(f"{MODEL.name}:{MODEL.version}")),
            served_name=MODEL.name,
            engine=EngineKind.TRANSFORMERS,
        )
    )
    client = ServingClient.connect(f"127.0.0.1:{port}", timeout=120)
    cleanup.push_async_callback(client.close)
    await client.wait_ready()

    def request(text: str) -> Any:
        return spb.GenerateRequest(
            model=spb.ModelSelector(served_name=MODEL.name),
            prompt=generation_pb2.Prompt(text=text),
            sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=MISS_TOKENS, ignore_eos=True),
        )

    stored = request(PROMPT)
    fresh = itertools.count()

    async def hit() -> Any:  # a bare stub call, as the plain echo is called
        response = await client.stub.Generate(stored, timeout=120)
        assert response.cached, "expected a serving cache hit"
        return response

    async def miss() -> Any:
        response = await client.unary(client.stub.Generate, request(f"{PROMPT} #{next(fresh)}"))
        assert not response.cached, "expected a serving cache miss"
        return response

    first = await client.unary(client.stub.Generate, stored)  # the first call generates and stores
    assert not first.cached
    return {"serving hit": hit, "serving miss": miss}


async def run(calls: int, rounds: int) -> tuple[dict[str, dict[str, list[float]]], int]:
    """Per path, the per-round p50s and p99s (ms); and the stored answer's size."""
    with RedisServer() as redis:
        settings = Settings.load(env={"LLMOPS_REDIS_URL": redis.url, "LLMOPS_CACHE_REDIS_TIMEOUT_MS": "1000"})
        cache = build_response_cache(settings, CollectorRegistry())
        await cache.backend.start()
        stored = keys.make_key(MODEL, Prompt(text=PROMPT), SamplingParams(greedy=True, max_tokens=128))
        payload = CODEC.encode(answer())
        await cache.store(stored, payload)
        backend: Any = cache.backend
        entry_key = await anext(backend.client.scan_iter(match=f"{backend.prefix}e:*"))

        async def raw_get() -> bytes:
            return bytes(await backend.client.get(entry_key))

        cache_server, cache_app = await start_app(
            build_app, settings, host="127.0.0.1", port=0, metrics_port=None
        )
        client = CacheClient.connect(f"127.0.0.1:{cache_server.port}", timeout=10)
        await client.wait_ready()
        request = pb.LookupRequest(key=proto_key())

        async def grpc_lookup() -> generation_pb2.GeneratedOutput:
            response = await client.unary(client.stub.Lookup, request)
            assert response.outcome == pb.CACHE_OUTCOME_HIT
            return response.output

        stop_echo, echo_port = await plain_server()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}")
        echo = channel.unary_unary(f"/{ECHO}/Echo", None, None)
        paths: dict[str, Call] = {
            "plain echo": lambda: echo(b"x" * 64),
            "raw GET": raw_get,
            "in-process": in_process_lookup(cache),
            "cache gRPC": grpc_lookup,
        }
        cleanup = contextlib.AsyncExitStack()
        try:
            paths.update(await serving_paths(settings, cleanup))
            counts = {name: calls for name in paths}
            counts["serving miss"] = max(1, MISS_CALLS // rounds)
            for name, call in paths.items():  # warm connections, scripts, code paths
                await sequential(call, min(50, counts[name]))
            results: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p99": []} for name in paths}
            for order in alternating(list(paths), rounds):
                for name in order:
                    latencies = await sequential(paths[name], counts[name])
                    results[name]["p50"].append(percentile(latencies, 50) * 1000)
                    results[name]["p99"].append(percentile(latencies, 99) * 1000)
        finally:
            await cleanup.aclose()
            await channel.close(None)
            await stop_echo()
            await client.close()
            await cache_server.stop(0)
            await cache_app.close()
            await cache.backend.close()
        return results, len(payload)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=quick_default(), help="500 calls a round")
    parser.add_argument("--calls", type=int, default=None, help="calls per path per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    calls = args.calls or (500 if args.quick else 1000)
    results, size = asyncio.run(run(calls, args.rounds))
    p50 = {name: median(r["p50"]) for name, r in results.items()}
    p99 = {name: median(r["p99"]) for name, r in results.items()}
    table = Table(
        title=f"cache hit latency ({calls} sequential calls per path x {args.rounds} rounds, medians of the "
        f"rounds; serving miss {MISS_CALLS}; stored answer {size} B; 127.0.0.1)"
    )
    for column in ("path", "p50 ms", "p99 ms", "p50 / echo", "p99 / echo"):
        table.add_column(column, justify="right")
    for name in results:
        table.add_row(
            name, f"{p50[name]:.3f}", f"{p99[name]:.3f}",
            f"{p50[name] / p50['plain echo']:.2f}x", f"{p99[name] / p99['plain echo']:.2f}x",
        )  # fmt: skip
    Console().print(table)
    return finish(
        Goal("cache_serving_hit_p50_over_echo", p50["serving hit"] / p50["plain echo"], "<=", GOAL),
        Goal("cache_serving_hit_p99_over_echo", p99["serving hit"] / p99["plain echo"], "<=", GOAL),
    )


if __name__ == "__main__":
    sys.exit(main())
