"""Fuzzing the cache service (real gRPC server on port 0 over a real redis-server).

Invariant: whatever Lookup, Store, Invalidate and Stats are sent — fuzzed messages, mutations of
known-good ones, undecodable bytes, an oversized message — the answer is OK or a caller-error
status with a message, never INTERNAL/UNKNOWN/UNAVAILABLE, and afterwards the server is SERVING and
a store-then-lookup round trip still hits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llmops.cache.redis_server import RedisServer
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2, usage_pb2
from tests.fuzz.suite import FuzzSuite, Target
from tests.integration.cache.conftest import start_cache
from tests.redis_fixture import redis_server

__all__ = ["redis_server"]
pytestmark = pytest.mark.fuzz

KEY = pb.CacheKey(
    model=model_pb2.ResolvedModel(name="fuzz", version=1, alias="champion"),
    prompt=generation_pb2.Prompt(text="Hello"),
    sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=8),
)
OUTPUT = generation_pb2.GeneratedOutput(
    completions=[
        generation_pb2.Completion(
            index=0, text="world", token_ids=[11, 12], finish_reason=generation_pb2.FINISH_REASON_STOP
        )
    ],
    prompt_token_ids=[1, 5],
    usage=usage_pb2.Usage(prompt_tokens=2, completion_tokens=2, total_tokens=4),
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def target(redis_server: RedisServer) -> AsyncIterator[Target]:
    running = await start_cache(redis_server.url)
    channel = grpc.aio.insecure_channel(running.address)
    stub = running.client.stub

    async def known_good() -> None:
        await stub.Store(pb.StoreRequest(key=KEY, output=OUTPUT), timeout=10)
        found = await stub.Lookup(pb.LookupRequest(key=KEY), timeout=10)
        assert found.outcome == pb.CACHE_OUTCOME_HIT and found.output.completions[0].text == "world"

    yield Target(
        channel,
        "llmops.cache.v1.CacheService",
        known_good,
        running.settings.max_message_bytes,
        running.address,
    )
    await channel.close()
    await running.stop()


class TestCacheFuzz(FuzzSuite):
    pb_module = pb
    service = "cache"
    seeds = {
        "Lookup": [pb.LookupRequest(key=KEY)],
        "Store": [pb.StoreRequest(key=KEY, output=OUTPUT)],
        "Invalidate": [pb.InvalidateRequest(model_name="fuzz", alias="champion")],
    }
    timeout = 10.0
    examples = 30
