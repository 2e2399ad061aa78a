"""The registry's alias weights split traffic through the router (real registry, real replicas).

Invariants: with champion 90 / challenger 10, over 1,000 sessions the challenger's share is within
0.10 +- 0.04 (more than 4 standard deviations of a fair binomial draw: sd = sqrt(0.1 * 0.9 / 1000)
= 0.0095, so a correct router fails this less than once in 30,000 runs); every request of a session
reaches the same version; every answer is labelled with the version that gave it (the router's
per-version counts match the answers); weights moved in the registry reach the router.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
import pytest_asyncio

from llmops.common.artifacts.client import upload_directory
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from tests.integration.registry.conftest import RunningRegistry, start_registry, stop_registry
from tests.integration.router.conftest import Fleet, poll_until
from tests.registry_support import write_llama


@pytest_asyncio.fixture(loop_scope="session")
async def registry(tmp_path_factory: pytest.TempPathFactory) -> object:
    running = await start_registry(tmp_path_factory.mktemp("registry"), tmp_path_factory.getbasetemp())
    yield running
    await stop_registry(running)


async def two_versions(registry: RunningRegistry, folder: Path) -> tuple[int, int]:
    client = registry.client
    meta = rpb.VersionMetadata(model_name="tiny", create_model=True, format=model_pb2.MODEL_FORMAT_FP32)
    v1 = (await upload_directory(client, meta, folder)).version
    v2 = (await upload_directory(client, meta, folder)).version
    for alias, version in (("champion", v1), ("challenger", v2)):
        await client.unary(
            client.stub.SetAlias, rpb.SetAliasRequest(model_name="tiny", alias=alias, version=version)
        )
    return v1, v2


def ask(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=pb.ModelSelector(served_name="tiny"),
        prompt=generation_pb2.Prompt(text=f"q{i}"),
        sampling=sampling_pb2.SamplingParams(max_tokens=1, temperature=0.0),
    )


async def test_weights_90_10_split_sessions_sticky_and_labelled(
    registry: RunningRegistry, fleet: Fleet, make_router, tmp_path: Path
) -> None:
    v1, v2 = await two_versions(registry, write_llama(tmp_path / "model"))
    await registry.client.set_alias_weights("tiny", {"champion": 90, "challenger": 10})
    champion = (await fleet.start(1, version=v1, alias="champion"))[0]
    challenger = (await fleet.start(1, version=v2, alias="challenger"))[0]
    router = await make_router(
        [champion.address, challenger.address],
        env={"LLMOPS_REGISTRY_ADDRESS": registry.address},
        traffic_split="true",
    )
    await router.wait_ready(2)
    stub = router.client.stub
    gate = asyncio.Semaphore(16)

    async def session_call(session: str, i: int) -> int:
        async with gate:
            answer = await stub.Generate(ask(i), metadata=(("x-llmops-session-id", session),), timeout=60)
            return int(answer.model.version)

    versions = await asyncio.gather(*(session_call(f"user-{i}", i) for i in range(1000)))
    share = Counter(versions)[v2] / 1000
    print(f"challenger share over 1,000 sessions: {share:.3f} (weight 0.10)")
    assert abs(share - 0.10) <= 0.04, share
    stats = await router.stats()
    counted = {v.model.version: v.requests for v in stats.versions}
    assert counted == dict(Counter(versions))

    repeats = await asyncio.gather(*(session_call(f"user-{s}", r) for s in range(40) for r in range(5)))
    for s in range(40):
        assert set(repeats[s * 5 : s * 5 + 5]) == {versions[s]}, f"session user-{s} changed version"

    # weights moved in the registry reach the router (refreshed in the background)
    await registry.client.set_alias_weights("tiny", {"champion": 0, "challenger": 1})

    async def all_challenger() -> bool:
        found = await asyncio.gather(*(session_call(f"late-{i}", i) for i in range(20)))
        return set(found) == {v2}

    await poll_until(all_challenger, timeout=60, what="the new weights in force")
