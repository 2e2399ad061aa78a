"""A pool replica's reload rules, on the fake engine and a fake pool record (no sockets):

- a replica with nothing loaded loads its pool's target at once, without the lease;
- a replica whose version differs from the target reloads only while it holds the lease, and waits
  otherwise; a bumped generation reloads it once on the same version;
- a reload takes it out of readiness, unloads the old engine before the new one is built (never two
  copies), loads, comes back, releases the lease, and counts itself;
- in a pool, follow_alias is refused (the pool decides the version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from llmops.common.errors import FailedPrecondition
from llmops.proto.registry.v1 import fleet_service_pb2 as fpb
from llmops.serving.config import ServingConfig
from llmops.serving.domain import EngineKind, EngineOptions, LoadRequest, ModelRef, ModelSource
from llmops.serving.engines.fake import FakeEngine
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.pool import Phase, PoolMetrics, PoolReplica
from llmops.serving.service import ServingService
from tests.unit.serving.conftest import StaticResolver


class FakeFleet:
    """The registry's pool record for one pool, answering the calls a replica makes."""

    def __init__(self) -> None:
        self.target = 1
        self.generation = 0
        self.holder = ""
        self.acquired = 0
        self.stub = self
        self.reports: list[fpb.PoolMember] = []

    async def unary(self, method: Any, request: Any) -> Any:
        return method(request)

    def SyncPool(self, request: fpb.SyncPoolRequest) -> fpb.SyncPoolResponse:
        self.reports.append(request.member)
        return fpb.SyncPoolResponse(
            pool=fpb.Pool(model_name="llm", pool="champion", alias="champion", target_version=self.target,
                          generation=self.generation, lease=fpb.ReloadLease(holder=self.holder))
        )  # fmt: skip

    def AcquireReloadLease(self, request: fpb.AcquireReloadLeaseRequest) -> fpb.AcquireReloadLeaseResponse:
        granted = self.holder in ("", request.holder)
        if granted:
            self.holder = request.holder
            self.acquired += 1
        return fpb.AcquireReloadLeaseResponse(granted=granted, lease=fpb.ReloadLease(holder=self.holder))

    def ReleaseReloadLease(self, request: fpb.ReleaseReloadLeaseRequest) -> fpb.ReleaseReloadLeaseResponse:
        assert self.holder == request.holder
        self.holder = ""
        return fpb.ReleaseReloadLeaseResponse()

    async def close(self) -> None:
        pass


class Pod:
    """One pool replica: the service, its engines, the pool loop, and what was seen while loading."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.resolver = StaticResolver()
        self.engines: list[FakeEngine] = []
        self.seen_while_building: list[tuple[int, bool]] = []  # (engines running, replica accepting)
        self.fail_next = ""
        self.service = ServingService(
            self.factory,
            self.resolver,
            ServingMetrics(self.registry),
            EngineShimMetrics(),
            ServingConfig(default_engine=EngineKind.FAKE, pool="champion"),
        )
        self.fleet = FakeFleet()
        template = LoadRequest(ModelSource(model_ref=ModelRef("llm", alias="champion")), served_name="llm")
        self.replica = PoolReplica(
            self.service, self.fleet, template, "champion", PoolMetrics(self.registry),
            replica_id=lambda: "pod-a", poll_seconds=0.01, lease_seconds=30, settle_seconds=0.0,
            drain_timeout=1.0,
        )  # fmt: skip

    def factory(self, kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> FakeEngine:
        self.seen_while_building.append((sum(e.started for e in self.engines), self.replica.accepting))
        engine = FakeEngine(path, served_name, options, fail_start=self.fail_next or None)
        self.fail_next = ""
        self.engines.append(engine)
        return engine

    def move(self, version: int) -> None:
        self.fleet.target = self.resolver.version = version

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"model": "llm", "pool": "champion", **labels}) or 0.0


@pytest.fixture
async def pod() -> Pod:
    pod = Pod()
    await pod.replica.step()
    return pod


async def test_a_new_replica_loads_the_target_without_the_lease(pod: Pod) -> None:
    assert (pod.replica.version, pod.replica.phase) == (1, Phase.READY)
    assert pod.fleet.acquired == 0
    assert await pod.replica.ready() and await pod.service.ready()
    assert pod.metric("llmops_serving_pool_version") == 1


async def test_waits_while_another_replica_holds_the_lease(pod: Pod) -> None:
    pod.move(2)
    pod.fleet.holder = "pod-b"
    await pod.replica.step()
    assert (pod.replica.version, pod.replica.phase) == (1, Phase.WAITING)
    assert len(pod.engines) == 1 and pod.engines[0].started
    assert await pod.replica.ready()  # still serving the old version meanwhile


async def test_reload_unloads_first_and_releases_the_lease(pod: Pod) -> None:
    pod.move(2)
    await pod.replica.step()
    assert (pod.replica.version, pod.replica.phase) == (2, Phase.READY)
    # the second engine was built with no engine running and the replica out of the rotation
    assert pod.seen_while_building == [(0, True), (0, False)]
    assert [e.started for e in pod.engines] == [False, True]
    assert pod.fleet.holder == "" and pod.fleet.acquired == 1
    assert await pod.replica.ready() and await pod.service.ready()
    assert pod.metric("llmops_serving_reloads_total", outcome="succeeded") == 1
    assert pod.metric("llmops_serving_pool_version") == 2
    phases = {m.phase for m in pod.fleet.reports}
    assert {fpb.RELOAD_PHASE_DRAINING, fpb.RELOAD_PHASE_UNLOADING, fpb.RELOAD_PHASE_LOADING} <= phases


async def test_a_bumped_generation_reloads_once(pod: Pod) -> None:
    pod.fleet.generation = 1
    await pod.replica.step()
    await pod.replica.step()
    assert len(pod.engines) == 2 and pod.replica.version == 1 and pod.replica.generation == 1
    assert pod.metric("llmops_serving_reloads_total", outcome="succeeded") == 1


async def test_follow_alias_is_refused_in_a_pool(pod: Pod) -> None:
    request = LoadRequest(
        ModelSource(model_ref=ModelRef("llm", alias="champion")), served_name="other", follow_alias=True
    )
    with pytest.raises(FailedPrecondition):
        await pod.service.load_model(request)


async def test_a_failed_reload_releases_the_lease_and_loads_again(pod: Pod) -> None:
    pod.move(2)
    pod.fail_next = "out of memory"
    with pytest.raises(FailedPrecondition):
        await pod.replica.step()
    assert (pod.replica.version, pod.replica.phase) == (0, Phase.FAILED)
    assert pod.fleet.holder == "", "a failed reload must not keep the pool's lease"
    assert pod.metric("llmops_serving_reloads_total", outcome="failed") == 1
    await pod.replica.step()  # nothing serving: it loads the target again at the next sync
    assert (pod.replica.version, pod.replica.phase) == (2, Phase.READY)
    assert await pod.service.ready()
