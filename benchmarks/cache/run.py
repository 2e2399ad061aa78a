"""Cache benchmark (`python benchmarks/cache/run.py`): what a cache hit costs on each path, in one run.

Against a redis-server started here, on one stored answer (a 128-token ``GeneratedOutput``):

  raw GET        redis.asyncio GET of the stored entry: the floor, one Redis round trip.
  in-process     ``ResponseCache.lookup`` + key hashing + proto decode, as serving calls it in-process.
  cache gRPC     ``CacheService.Lookup`` from a client (the server hashes, looks up, answers).
  front+local    a gRPC call to a front server whose handler does the in-process lookup: the shape of
                 a hit through serving's gRPC path with the cache in-process.
  front+service  the same front server calling the cache service over gRPC: a hit through serving's
                 gRPC path if serving used the cache service.
  serving hit    (when serving is importable and wired to the cache) Generate through serving's gRPC
                 server, answered from the cache; and a miss on the tiny model for comparison.

Rounds alternate the paths so background load hits all alike. Prints p50/p99 per path, ratios to
the raw GET, and the issue's goals: hit p99 <= 2 ms end to end; hit p50 <= 3x the raw round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from llmops.cache import keys
from llmops.cache.app import build_app, build_response_cache
from llmops.cache.codec import GeneratedOutputCodec
from llmops.cache.domain import Prompt, ResolvedModel, SamplingParams
from llmops.cache.redis_server import RedisServer
from llmops.cache.service import ResponseCache
from llmops.common.app import start_app
from llmops.common.clients import CacheClient
from llmops.common.server import ServiceBinding, create_server
from llmops.common.settings import Settings
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2, usage_pb2

FRONT = "llmops.bench.v1.FrontService"
PROMPT = "Write a haiku about caches and the cost of a round trip."
MODEL = ResolvedModel("tiny", 1, "champion")
CODEC = GeneratedOutputCodec()
MISS_TOKENS = 16  # tokens per serving request (hit and miss alike)
MISS_CALLS = 30  # serving-miss calls in all, spread over the rounds: each one runs the model

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


def add_front(local: Call, remote: Call) -> Callable[[Any, grpc.aio.Server], None]:
    async def via_local(request: bytes, context: Any) -> bytes:
        return CODEC.encode(await local())

    async def via_service(request: bytes, context: Any) -> bytes:
        return CODEC.encode(await remote())

    def add(servicer: object, server: grpc.aio.Server) -> None:
        handlers = {
            "Local": grpc.unary_unary_rpc_method_handler(via_local, lambda b: b, lambda b: b),
            "Service": grpc.unary_unary_rpc_method_handler(via_service, lambda b: b, lambda b: b),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FRONT, handlers),))

    return add


async def sequential(call: Call, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return latencies


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def serving_paths(settings: Settings, cleanup: contextlib.AsyncExitStack) -> dict[str, Call] | None:
    """Serving's own hit and miss paths: Generate through serving's gRPC server, with the tiny model
    on the transformers engine loaded as ``tiny:1`` and the response cache on ``settings``' Redis.

    ``serving hit`` repeats one greedy request (answered from the cache after the first call);
    ``serving miss`` sends a fresh prompt each call, so the engine generates. ``None`` when serving
    or the transformers engine is not importable in this environment.
    """
    try:
        from llmops.common.clients import ServingClient
        from llmops.common.tiny_model import build_tiny_model
        from llmops.proto.serving.v1 import serving_service_pb2 as spb
        from llmops.serving.app import ServingApp
        from llmops.serving.domain import EngineKind, LoadRequest, ModelRef, ModelSource, ResolvedSource
        from llmops.serving.domain import ResolvedModel as ServingModel
        from llmops.serving.resolver import ModelResolver
    except ImportError:
        return None

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

    async def hit() -> Any:
        response = await client.unary(client.stub.Generate, stored)
        assert response.cached, "expected a serving cache hit"
        return response

    async def miss() -> Any:
        response = await client.unary(client.stub.Generate, request(f"{PROMPT} #{next(fresh)}"))
        assert not response.cached, "expected a serving cache miss"
        return response

    first = await client.unary(client.stub.Generate, stored)  # the first call generates and stores
    assert not first.cached
    return {"serving hit": hit, "serving miss": miss}


async def run(calls: int, rounds: int) -> tuple[dict[str, list[float]], int]:
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

        local = in_process_lookup(cache)
        front_server, front_port = await create_server(
            "127.0.0.1:0", [ServiceBinding(FRONT, None, add_front(local, grpc_lookup))], settings
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{front_port}")
        front_local = channel.unary_unary(f"/{FRONT}/Local")
        front_service = channel.unary_unary(f"/{FRONT}/Service")
        paths: dict[str, Call] = {
            "raw GET": raw_get,
            "in-process": local,
            "cache gRPC": grpc_lookup,
            "front+local": lambda: front_local(b""),
            "front+service": lambda: front_service(b""),
        }
        cleanup = contextlib.AsyncExitStack()
        results: dict[str, list[float]] = {}
        try:
            serving = await serving_paths(settings, cleanup)
            if serving:  # the raw GET of the very entry a serving hit reads, stored by its first call
                served_key = [k async for k in backend.client.scan_iter(match=f"{backend.prefix}e:*")]
                served_key.remove(entry_key)
                assert len(served_key) == 1, served_key
                served_size = len(await backend.client.get(served_key[0]))

                async def raw_get_served() -> bytes:
                    return bytes(await backend.client.get(served_key[0]))

                paths[f"raw GET ({served_size} B)"] = raw_get_served
                paths.update(serving)
            counts = {name: calls for name in paths}
            if "serving miss" in counts:
                counts["serving miss"] = max(1, MISS_CALLS // rounds)
            results = {name: [] for name in paths}
            for name, call in paths.items():  # warm connections, scripts, code paths
                await sequential(call, min(50, counts[name]))
            for _ in range(rounds):
                for name, call in paths.items():
                    results[name] += await sequential(call, counts[name])
        finally:
            await cleanup.aclose()
            await channel.close()
            await front_server.stop(0)
            await client.close()
            await cache_server.stop(0)
            await cache_app.close()
            await cache.backend.close()
        return results, len(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results, size = asyncio.run(run(args.calls, args.rounds))
    base50, base99 = pct(results["raw GET"], 50), pct(results["raw GET"], 99)
    table = Table(
        title=f"cache hit latency ({args.calls} x {args.rounds} sequential calls per path, serving miss "
        f"{MISS_CALLS}; raw GET: {size}-byte entry; 127.0.0.1)"
    )
    for column in ("path", "p50 ms", "p99 ms", "p50 / raw GET", "p99 / raw GET"):
        table.add_column(column, justify="right")
    for name, values in results.items():
        p50, p99 = pct(values, 50), pct(values, 99)
        table.add_row(name, f"{p50:.3f}", f"{p99:.3f}", f"{p50 / base50:.2f}x", f"{p99 / base99:.2f}x")
    console = Console()
    console.print(table)
    hit = "serving hit" if "serving hit" in results else "front+local"
    same = next((name for name in results if name.startswith("raw GET (")), "raw GET")  # hit's own entry
    p50, p99, same50 = pct(results[hit], 50), pct(results[hit], 99), pct(results[same], 50)
    console.print(
        f"goals on '{hit}': p99 {p99:.3f} ms <= 2 ms: {'met' if p99 <= 2 else 'MISSED'}; "
        f"p50 {p50 / same50:.2f}x '{same}' p50 <= 3x: {'met' if p50 <= 3 * same50 else 'MISSED'}"
    )
    if "serving miss" in results:
        miss50 = pct(results["serving miss"], 50)
        console.print(
            f"serving miss (tiny model, {MISS_TOKENS} tokens, {len(results['serving miss'])} calls) p50 "
            f"{miss50:.3f} ms = {miss50 / p50:.1f}x the serving hit p50"
        )
    gap50 = pct(results["front+service"], 50) - pct(results["front+local"], 50)
    gap99 = pct(results["front+service"], 99) - pct(results["front+local"], 99)
    console.print(
        f"cache service over gRPC instead of in-process adds {gap50:.3f} ms at p50 and {gap99:.3f} ms at p99 "
        f"({pct(results['front+service'], 50) / pct(results['front+local'], 50):.2f}x p50)"
    )
    if "serving hit" not in results:
        console.print("serving hit / tiny-model miss: not measured (serving is not wired to the cache yet)")


if __name__ == "__main__":
    main()
