"""The router in front of real serving replicas routes each request by its policy.

Invariants: a client that talks to the router gets the same answers as from a replica (unary and
stream); round robin spreads requests over every ready replica; session affinity keeps a session on
one replica; prefix affinity keeps a shared prefix on one replica until it saturates and then
spills (counted); a bad routing header is INVALID_ARGUMENT before any replica is touched.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.router.v1 import router_service_pb2 as rpb
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from tests.integration.router.conftest import Fleet, Replica, RunningRouter, start_replica


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shared() -> AsyncIterator[list[Replica]]:
    """Three plain replicas for the tests that only read (each test has its own router, whose
    counts start at zero)."""
    replicas = list(await asyncio.gather(*(start_replica() for _ in range(3))))
    yield replicas
    await asyncio.gather(*(r.kill() for r in replicas))


def request(prompt: str, max_tokens: int = 4, stream: bool = False) -> pb.GenerateRequest:
    kind = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    return kind(  # type: ignore[no-any-return]
        model=pb.ModelSelector(served_name="tiny"),
        prompt=generation_pb2.Prompt(text=prompt),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


async def served_by(router: RunningRouter) -> dict[str, int]:
    return {e.address: e.requests for e in await router.endpoints()}


async def test_answers_through_the_router_match_a_replica(shared: list[Replica], make_router) -> None:
    replicas = shared[:2]
    router = await make_router([r.address for r in replicas], policy="round_robin")
    await router.wait_ready(2)
    from llmops.common.clients import ServingClient

    async with ServingClient.connect(replicas[0].address) as direct:
        expected = await direct.unary(direct.stub.Generate, request("def add(a, b):", 8))
    routed = await router.client.unary(router.client.stub.Generate, request("def add(a, b):", 8))
    assert routed.output.completions[0].text == expected.output.completions[0].text
    assert routed.model.name == "tiny" and routed.model.version == 1

    pieces = []
    async for message in router.client.stream(
        router.client.stub.GenerateStream, request("def add(a, b):", 8, True)
    ):
        if message.HasField("delta"):
            pieces.append(message.delta.text_delta)
        else:
            assert message.end.usage.completion_tokens == 8
    assert "".join(pieces) == expected.output.completions[0].text

    models = await router.client.unary(router.client.stub.ListModels, pb.ListModelsRequest())
    assert [m.served_name for m in models.models] == ["tiny"]


async def test_round_robin_spreads_and_session_affinity_sticks(shared: list[Replica], make_router) -> None:
    replicas = shared
    router = await make_router([r.address for r in replicas], policy="round_robin")
    await router.wait_ready(3)
    for i in range(9):
        await router.client.unary(router.client.stub.Generate, request(f"prompt {i}"))
    assert sorted((await served_by(router)).values()) == [3, 3, 3]

    homes: dict[str, set[str]] = {}
    for session in ("alice", "bob", "carol", "dave"):
        for _ in range(4):
            before = await served_by(router)
            metadata = (("x-llmops-session-id", session),)
            await router.client.stub.Generate(request("hello"), metadata=metadata, timeout=30)
            after = await served_by(router)
            homes.setdefault(session, set()).update(a for a in after if after[a] != before[a])
    assert all(len(home) == 1 for home in homes.values()), homes


async def test_prefix_affinity_sticks_until_saturated_then_spills(fleet: Fleet, make_router) -> None:
    replicas = await fleet.start(2, step_delay=0.02, concurrency=1)
    router = await make_router(
        [r.address for r in replicas], policy="prefix_affinity", prefix_block_chars=32, saturation_waiting=1
    )
    await router.wait_ready(2)
    shared = "You are a helpful assistant. " * 8
    for i in range(6):  # one at a time: never saturated, so every request lands on the first holder
        await router.client.unary(router.client.stub.Generate, request(shared + f"question {i}", 2))
    counts = sorted((await served_by(router)).values())
    assert counts == [0, 6], counts
    stats = await router.stats()
    assert stats.prefix_hits == 5 and stats.prefix_misses == 1 and stats.saturation_spills == 0

    # many at once: the holder's slot and queue fill, affinity gives way to the other replica
    await asyncio.gather(
        *(
            router.client.unary(router.client.stub.Generate, request(shared + f"burst {i}", 8))
            for i in range(8)
        )
    )
    stats = await router.stats()
    assert stats.saturation_spills > 0
    assert min((await served_by(router)).values()) > 0


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ((("x-llmops-route-policy", "fastest"),), "x-llmops-route-policy"),
        ((("x-llmops-route-policy", "session_affinity"),), "x-llmops-session-id"),
        ((("x-llmops-session-id", "has spaces"),), "x-llmops-session-id"),
        ((("x-llmops-session-id", "x" * 129),), "x-llmops-session-id"),
    ],
)
async def test_bad_routing_headers_are_invalid_argument(
    shared: list[Replica], make_router, metadata, field
) -> None:
    replicas = shared[:1]
    router = await make_router([r.address for r in replicas])
    await router.wait_ready(1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.client.stub.Generate(request("hi"), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in router.client.stub.GenerateStream(
            request("hi", stream=True), metadata=metadata, timeout=10
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sum((await served_by(router)).values()) == 0


async def test_admin_api_reports_endpoints_policy_and_versions(shared: list[Replica], make_router) -> None:
    replicas = shared[1:]
    router = await make_router([r.address for r in replicas], policy="least_loaded")
    await router.wait_ready(2)
    policy = await router.admin.GetPolicy(rpb.GetPolicyRequest(), timeout=5)
    assert policy.policy == rpb.POLICY_LEAST_LOADED and policy.discovery == "static"
    for i in range(10):
        await router.client.unary(router.client.stub.Generate, request(f"q{i}"))
    endpoints = await router.endpoints()
    assert {e.address for e in endpoints} == {r.address for r in replicas}
    assert all(e.models[0].served_name == "tiny" and e.models[0].ready for e in endpoints)
    assert all(e.http_port > 0 for e in endpoints)
    stats = await router.stats()
    decisions = Counter({d.policy: d.decisions for d in stats.decisions})
    assert decisions[rpb.POLICY_LEAST_LOADED] == 10
    assert [(v.model.name, v.model.version, v.requests) for v in stats.versions] == [("tiny", 1, 10)]
    assert 0 < stats.decision_p99_seconds < 1
