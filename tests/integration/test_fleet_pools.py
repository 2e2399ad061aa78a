"""Serving pools in the embedded stack: an alias move rolls its pool under load, one replica at a time.

Real registry (MLflow on SQLite, FleetService), three real serving processes on a tiny model with the
transformers engine (pool ``champion``: 2 replicas, pool ``challenger``: 1), the real router in
front; a load of ``tiny@champion`` requests runs through the router the whole time. Invariants:

- moving ``champion`` rolls the champion pool: no request fails, no replica ever lists two versions,
  every champion replica ends on the new version, at every sample at least replicas - 1 champion
  replicas are SERVING and at most one is in a reload phase (the lease), and the challenger pool
  (already on the new version) takes champion traffic meanwhile;
- ``llmops fleet reload`` rolls the pool again (each replica reloads once, under load, no failure);
- ``llmops fleet status`` shows pools, versions and weights; bad input gets the right status codes.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from llmops.common.artifacts.client import upload_directory
from llmops.common.clients import FleetClient, RegistryClient, open_channel
from llmops.common.errors import LLMOpsError, NotFound
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2
from llmops.proto.registry.v1 import fleet_service_pb2 as fpb
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.proto.router.v1 import router_service_pb2 as router_pb
from llmops.proto.router.v1 import router_service_pb2_grpc as router_grpc
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.proto.serving.v1 import serving_service_pb2_grpc as pb_grpc
from llmops.stack.fleet import fleet_app
from llmops.stack.stack import LocalStack, StackOptions, StackState, alive
from tests.conftest import require_tool
from tests.registry_support import write_llama

RELOADING = {fpb.RELOAD_PHASE_DRAINING, fpb.RELOAD_PHASE_UNLOADING, fpb.RELOAD_PHASE_LOADING}
SERVING = "llmops.serving.v1.ServingService"


def champion_request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=pb.ModelSelector(model_ref=model_pb2.ModelRef(name="tiny", alias="champion")),
        prompt=generation_pb2.Prompt(text=f"q{i}"),
        # sampled, so neither the router's nor serving's response cache takes it: every request is served
        sampling=sampling_pb2.SamplingParams(max_tokens=2, temperature=1.0),
    )


class Load:
    """Requests through the router until stopped: answers per version, failures."""

    def __init__(self, router: str, workers: int = 4) -> None:
        self.channel = open_channel(router)
        self.stub = pb_grpc.ServingServiceStub(self.channel)
        self.versions: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(workers)]

    async def _worker(self, w: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                answer = await self.stub.Generate(champion_request(w * 100_000 + i), timeout=60)
                self.versions[int(answer.model.version)] += 1
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.channel.close(None)


class Sampler:
    """Every 100 ms: each champion replica's health and loaded versions, and the pool's member phases."""

    def __init__(self, replicas: dict[str, str], fleet: FleetClient) -> None:
        self.channels = {name: open_channel(address) for name, address in replicas.items()}
        self.fleet = fleet
        self.samples: list[dict[str, Any]] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _one(self, name: str) -> tuple[bool, list[int]]:
        channel = self.channels[name]
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVING), timeout=5
            )
            models = await pb_grpc.ServingServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return False, []
        versions = [m.model.version for m in models.models if m.HasField("model")]
        return health.status == health_pb2.HealthCheckResponse.SERVING, versions

    async def _run(self) -> None:
        while not self._stop.is_set():
            answers = await asyncio.gather(*(self._one(name) for name in self.channels))
            pool = await self.fleet.unary(
                self.fleet.stub.GetPool, fpb.GetPoolRequest(model_name="tiny", pool="champion")
            )
            self.samples.append(
                {
                    "serving": sum(serving for serving, _ in answers),
                    "versions": [versions for _, versions in answers],
                    "reloading": sum(m.phase in RELOADING for m in pool.pool.members),
                }
            )
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        self._stop.set()
        await self._task
        for channel in self.channels.values():
            await channel.close(None)


async def pool_on(fleet: FleetClient, pool: str, version: int, replicas: int, generation: int = 0) -> None:
    """Until ``replicas`` members of ``pool`` serve ``version`` at ``generation`` or later, READY."""
    deadline = time.monotonic() + 180
    members: Any = []
    while time.monotonic() < deadline:
        try:
            answer = await fleet.unary(fleet.stub.GetPool, fpb.GetPoolRequest(model_name="tiny", pool=pool))
        except NotFound:  # no replica has synced since the model was registered
            await asyncio.sleep(0.2)
            continue
        members = answer.pool.members
        done = [
            m
            for m in members
            if m.version == version
            and m.phase == fpb.RELOAD_PHASE_READY
            and m.serving
            and m.generation >= generation
        ]
        if len(done) == replicas:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"pool {pool} not on v{version} (generation {generation}): {members}")


def reloads(part_metrics: str) -> float:
    text = urllib.request.urlopen(part_metrics, timeout=5).read().decode()
    found = re.search(r'llmops_serving_reloads_total\{[^}]*outcome="succeeded"[^}]*\} ([0-9.]+)', text)
    return float(found.group(1)) if found else 0.0


def phase_seconds(part_metrics: str) -> dict[str, float]:
    text = urllib.request.urlopen(part_metrics, timeout=5).read().decode()
    sums = re.findall(
        r'llmops_serving_reload_phase_seconds_sum\{[^}]*phase="(\w+)"[^}]*\} ([0-9.e+-]+)', text
    )
    return {phase: round(float(value), 2) for phase, value in sums}


async def cli(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, fleet_app, list(args))


def champion_parts(state: StackState) -> dict[str, str]:
    return {p.name: p.address for p in state.parts if p.name.startswith("serving-champion-")}


@pytest.mark.slow
async def test_alias_move_rolls_the_pool_under_load(tmp_path: Path) -> None:
    require_tool("redis-server")
    options = StackOptions(
        data_dir=tmp_path / "stack",
        env={
            "LLMOPS_SERVING_ENGINE": "transformers",
            "LLMOPS_SERVING_POOL_POLL_SECONDS": "0.5",
            "LLMOPS_SERVING_POOL_SETTLE_SECONDS": "1",
            "LLMOPS_SERVING_DRAIN_TIMEOUT_SECONDS": "10",
            "LLMOPS_ROUTER_SPLIT_REFRESH_SECONDS": "0.5",
        },
        services=("registry", "serving"),
        prometheus=False,
        mlflow_ui=False,
        grace_seconds=20,
        # replicas publish readiness every 0.3 s (the registry keeps its default: it answers every sync)
        replica_env={
            name: {"LLMOPS_HEALTH_POLL_SECONDS": "0.3"}
            for name in ("serving-champion-1", "serving-champion-2", "serving-challenger-1")
        },
        pools={"champion": 2, "challenger": 1},
        pool_model="tiny",
    )
    stack = LocalStack(options)
    state = await asyncio.to_thread(stack.up)
    try:
        names = [p.name for p in state.parts]
        assert names == ["redis", "registry", "serving-champion-1", "serving-champion-2",
                         "serving-challenger-1", "router"]  # fmt: skip
        registry_address = next(p.address for p in state.parts if p.name == "registry")
        router = next(p for p in state.parts if p.name == "router")
        registry = RegistryClient.connect(registry_address, timeout=120)
        fleet = FleetClient.connect(registry_address, timeout=30)
        folder = write_llama(tmp_path / "model")
        meta = rpb.VersionMetadata(model_name="tiny", create_model=True, format=model_pb2.MODEL_FORMAT_FP32)
        v1 = (await upload_directory(registry, meta, folder)).version
        v2 = (await upload_directory(registry, meta, folder)).version
        for alias, version in (("champion", v1), ("challenger", v2)):
            await registry.unary(
                registry.stub.SetAlias, rpb.SetAliasRequest(model_name="tiny", alias=alias, version=version)
            )
        # replicas that started before the model existed load their pool's version now
        await pool_on(fleet, "champion", v1, 2)
        await pool_on(fleet, "challenger", v2, 1)
        admin_channel = open_channel(router.address)
        admin = router_grpc.RouterServiceStub(admin_channel)
        for _ in range(300):
            endpoints = (await admin.ListEndpoints(router_pb.ListEndpointsRequest(), timeout=5)).endpoints
            if sum(e.state == router_pb.ENDPOINT_STATE_READY for e in endpoints) == 3:
                break
            await asyncio.sleep(0.1)
        labels = sorted((e.pool, e.models[0].model.version) for e in endpoints if e.models)
        assert labels == sorted([("champion", v1), ("champion", v1), ("challenger", v2)]), endpoints
        assert {e.reload_phase for e in endpoints} == {"ready"}
        challenger_address = next(p.address for p in state.parts if p.name == "serving-challenger-1")

        def sent_to_challenger(listed: Any) -> int:
            return next(int(e.requests) for e in listed if e.address == challenger_address)

        # --- the alias moves while a load runs --------------------------------------------------
        load = Load(router.address)
        sampler = Sampler(champion_parts(state), fleet)
        for _ in range(1200):  # the load reaches the champion pool before the move
            if load.versions[v1] >= 8 or load.failures:
                break
            await asyncio.sleep(0.1)
        before = sent_to_challenger(
            endpoints := (await admin.ListEndpoints(router_pb.ListEndpointsRequest())).endpoints
        )
        assert before == 0  # champion traffic stays on the champion pool while the alias stands
        moved_at = time.monotonic()
        await registry.unary(
            registry.stub.SetAlias, rpb.SetAliasRequest(model_name="tiny", alias="champion", version=v2)
        )
        await pool_on(fleet, "champion", v2, 2)
        roll_seconds = time.monotonic() - moved_at
        await asyncio.sleep(1)
        listed = (await admin.ListEndpoints(router_pb.ListEndpointsRequest())).endpoints
        await sampler.stop()
        await load.stop()
        print(f"roll of 2 replicas: {roll_seconds:.1f}s; answers by version {dict(load.versions)}; "
              f"challenger took {sent_to_challenger(listed)} champion requests; {len(sampler.samples)} samples")  # fmt: skip
        assert load.failures == [], load.failures[:5]
        assert load.versions[v1] > 0 and load.versions[v2] > 0
        assert sent_to_challenger(listed) > 0, "the challenger pool did not take the moved champion's traffic"
        assert all(len(set(versions)) <= 1 for s in sampler.samples for versions in s["versions"])
        assert min(s["serving"] for s in sampler.samples) >= 1, "capacity fell below replicas - 1"
        assert max(s["reloading"] for s in sampler.samples) == 1, "not one replica at a time"
        champion_metrics = [p.metrics for p in state.parts if p.name.startswith("serving-champion-")]
        assert [reloads(url) for url in champion_metrics] == [1.0, 1.0]
        print("reload phase seconds per replica:", [phase_seconds(url) for url in champion_metrics])

        # --- llmops fleet reload rolls the pool again -------------------------------------------
        load = Load(router.address)
        sampler = Sampler(champion_parts(state), fleet)
        result = await cli("reload", "tiny", "champion", "--registry", registry_address)
        assert result.exit_code == 0, result.output
        assert "generation 1" in result.output
        await pool_on(fleet, "champion", v2, 2, generation=1)
        await sampler.stop()
        await load.stop()
        assert load.failures == [], load.failures[:5]
        assert min(s["serving"] for s in sampler.samples) >= 1
        assert max(s["reloading"] for s in sampler.samples) <= 1
        for _ in range(100):  # the last replica counts its reload once it has settled
            if [reloads(url) for url in champion_metrics] == [2.0, 2.0]:
                break
            await asyncio.sleep(0.1)
        assert [reloads(url) for url in champion_metrics] == [2.0, 2.0]

        # --- llmops fleet status, and bad input -------------------------------------------------
        result = await cli("status", "--registry", registry_address, "--json")
        assert result.exit_code == 0, result.output
        assert '"target_version": ' + str(v2) in result.output and '"pool": "challenger"' in result.output
        result = await cli("reload", "tiny", "nope", "--registry", registry_address)
        assert result.exit_code == 2 and "NOT_FOUND" in result.output
        bad: list[tuple[str, Any, grpc.StatusCode]] = [
            ("GetPool", fpb.GetPoolRequest(model_name="tiny", pool="nope"), grpc.StatusCode.NOT_FOUND),
            ("ReloadPool", fpb.ReloadPoolRequest(model_name="tiny", pool="Bad_Pool"), grpc.StatusCode.INVALID_ARGUMENT),
            ("SyncPool", fpb.SyncPoolRequest(model_name="nomodel", pool="p", alias="champion",
                                              member=fpb.PoolMember(replica_id="r", ttl_seconds=5)), grpc.StatusCode.NOT_FOUND),
            ("SyncPool", fpb.SyncPoolRequest(model_name="tiny", pool="p",
                                              member=fpb.PoolMember(replica_id="r", ttl_seconds=5)), grpc.StatusCode.INVALID_ARGUMENT),
            ("SyncPool", fpb.SyncPoolRequest(model_name="tiny", pool="p", version=999,
                                              member=fpb.PoolMember(replica_id="r", ttl_seconds=5)), grpc.StatusCode.NOT_FOUND),
            ("AcquireReloadLease", fpb.AcquireReloadLeaseRequest(model_name="tiny", pool="champion", holder="x",
                                                                 ttl_seconds=0), grpc.StatusCode.INVALID_ARGUMENT),
            ("ReleaseReloadLease", fpb.ReleaseReloadLeaseRequest(model_name="tiny", pool="champion", holder="x"),
             grpc.StatusCode.FAILED_PRECONDITION),
        ]  # fmt: skip
        for method, request, code in bad:
            with pytest.raises(LLMOpsError) as caught:
                await fleet.unary(getattr(fleet.stub, method), request)
            assert caught.value.code == code, (method, caught.value)
        await admin_channel.close(None)
        await fleet.close()
        await registry.close()
    finally:
        await asyncio.to_thread(stack.down)
    for _ in range(300):
        if not any(alive(p.pid) for p in state.parts):
            break
        await asyncio.sleep(0.1)
    assert [p.name for p in state.parts if alive(p.pid)] == []
