"""The response cache in front of the replicas (real Redis, real replica processes).

Invariants: a deterministic request answered once is served from the cache without touching any
replica (unary, and replayed as a stream), marked cached, with the version that stored it;
identical requests arriving together are computed once across replicas (single flight); a sampled
request without a seed is never cached; tenants never share answers (the key holds the tenant);
with serving's own cache on the same Redis (the embedded stack), the router's leader is not blocked by
serving waiting on the router's lock (the tiers lock under different scopes).
"""

from __future__ import annotations

import asyncio

from llmops.cache.redis_server import RedisServer
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from tests.integration.router.conftest import Fleet, RunningRouter
from tests.redis_fixture import redis_server

__all__ = ["redis_server"]


def generate(prompt: str, *, temperature: float = 0.0, stream: bool = False) -> pb.GenerateRequest:
    kind = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    return kind(  # type: ignore[no-any-return]
        model=pb.ModelSelector(served_name="tiny"),
        prompt=generation_pb2.Prompt(text=prompt),
        sampling=sampling_pb2.SamplingParams(max_tokens=6, temperature=temperature),
    )


async def replica_requests(router: RunningRouter) -> int:
    return sum(e.requests for e in await router.endpoints())


async def test_deterministic_answers_come_from_the_cache_once_computed(
    fleet: Fleet, make_router, redis_server: RedisServer
) -> None:
    replicas = await fleet.start(2, step_delay=0.02)
    # Redis calls get 1 s, not the default 50 ms: on a loaded CI machine a lookup past 50 ms fails
    # open (a counted miss) and the single-flight count below would measure the machine, not the cache.
    router = await make_router(
        [r.address for r in replicas],
        env={"LLMOPS_REDIS_URL": redis_server.url, "LLMOPS_CACHE_REDIS_TIMEOUT_MS": "1000"},
        policy="round_robin",
    )
    await router.wait_ready(2)
    client = router.client
    first = await client.unary(client.stub.Generate, generate("cache me"))
    assert not first.cached and await replica_requests(router) == 1
    again = await client.unary(client.stub.Generate, generate("cache me"))
    assert again.cached and again.output.completions[0].text == first.output.completions[0].text
    assert (again.model.name, again.model.version) == ("tiny", 1)
    streamed = [m async for m in client.stream(client.stub.GenerateStream, generate("cache me", stream=True))]
    assert all(m.cached for m in streamed)
    assert (
        "".join(m.delta.text_delta for m in streamed if m.HasField("delta"))
        == first.output.completions[0].text
    )
    assert await replica_requests(router) == 1
    assert (await router.stats()).cache_hits == 2

    # single flight: six identical requests at once, one computation on one replica
    answers = await asyncio.gather(
        *(client.unary(client.stub.Generate, generate("together")) for _ in range(6))
    )
    assert len({a.output.completions[0].text for a in answers}) == 1
    assert sum(not a.cached for a in answers) == 1
    assert await replica_requests(router) == 2

    # sampled without a seed: never cached
    for _ in range(2):
        answer = await client.unary(client.stub.Generate, generate("random", temperature=0.9))
        assert not answer.cached
    assert await replica_requests(router) == 4


async def test_router_and_serving_caches_on_one_redis_answer_within_the_deadline(
    fleet: Fleet, make_router, redis_server: RedisServer
) -> None:
    """The router's cache in front and serving's own share one Redis (the embedded stack): the
    request the router's leader forwards meets serving's single flight on the same key, and must not
    wait on the router's lock (before the fix it waited for itself until its deadline)."""
    replicas = await fleet.start(2, step_delay=0.02, redis_url=redis_server.url)
    router = await make_router(
        [r.address for r in replicas],
        env={"LLMOPS_REDIS_URL": redis_server.url, "LLMOPS_CACHE_REDIS_TIMEOUT_MS": "1000"},
        policy="round_robin",
    )
    await router.wait_ready(2)
    stub = router.client.stub
    first = await stub.Generate(generate("both tiers"), timeout=20)
    assert not first.cached
    answers = await asyncio.gather(
        *(stub.Generate(generate("both tiers, together"), timeout=20) for _ in range(4))
    )
    assert len({a.output.completions[0].text for a in answers}) == 1
    assert sum(not a.cached for a in answers) == 1
    again = await stub.Generate(generate("both tiers"), timeout=20)
    assert again.cached and again.output.completions[0].text == first.output.completions[0].text
    assert await replica_requests(router) == 2
