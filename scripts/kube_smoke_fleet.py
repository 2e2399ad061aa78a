"""kube-smoke's fleet checks on the pools the chart created: an alias move rolls the champion pool
under load, and a rollout promotes between the champion and the challenger pool's pods.

Both run through the router the harness starts on the host (kube_smoke_router.py: static discovery,
since podman has no EndpointSlices) with the chart router's settings for a cluster: the registry's
alias weights split each model's traffic, and the rollout controller runs in it.

- alias move: a load of streamed ``tiny@champion`` generates runs through the router; ``champion``
  moves to the challenger's version; the champion pool's pod (whose env the smoke never touched:
  LLMOPS_SERVING_POOL from the chart) sees its pool's target change in the registry's FleetService,
  takes the reload lease and goes draining -> unloading -> loading -> ready. No request may fail,
  the pod must end on the new version, and the challenger pool's pod (already on it) must take
  champion requests meanwhile. The phases are read from the pool record (sampled) and from the
  pod's own ``llmops_serving_reload_phase_seconds`` histogram.
- rollout: a third version becomes the challenger (the challenger pool reloads to it); a rollout
  from the champion to it runs with short steps while requests flow through the router; it must
  end PROMOTED with evidence on every step, and the champion pool then rolls to it.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

from llmops.common.clients import FleetClient, RegistryClient, open_channel
from llmops.common.errors import NotFound
from llmops.common.rollout_client import RolloutClient
from llmops.common.rollouts import RolloutState
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2
from llmops.proto.registry.v1 import fleet_service_pb2 as fpb
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.proto.router.v1 import router_service_pb2 as router_pb
from llmops.proto.router.v1 import router_service_pb2_grpc as router_grpc
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.proto.serving.v1 import serving_service_pb2_grpc as pb_grpc
from llmops.stack.rollout_demo import RolloutCase, follow, router_traffic

MODEL = "tiny"
#: How long a pool may take to reach a version (a reload of the tiny model on a busy 2-core machine).
POOL_TIMEOUT = 300.0
Say = Callable[[str], None]


class FleetFailure(RuntimeError):
    """A fleet check failed."""


def _request(i: int) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        model=pb.ModelSelector(model_ref=model_pb2.ModelRef(name=MODEL, alias="champion")),
        prompt=generation_pb2.Prompt(text=f"def f{i}():"),
        sampling=sampling_pb2.SamplingParams(max_tokens=8, greedy=True, ignore_eos=True),
        cache=pb.CacheControl(bypass=True, no_store=True),  # every request reaches a pod
    )


class Load:
    """Streamed ``tiny@champion`` generates through the router until stopped: answers per version, failures."""

    def __init__(self, router: str, workers: int = 3) -> None:
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
            version, text = 0, 0
            try:
                async for message in self.stub.GenerateStream(_request(w * 100_000 + i), timeout=120):
                    if message.HasField("delta"):
                        text += len(message.delta.text_delta)
                    if message.HasField("end"):
                        version = int(message.end.model.version)
                if not text or not version:
                    self.failures.append(f"empty answer (version {version}, {text} characters)")
                else:
                    self.versions[version] += 1
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.channel.close(None)


async def get_pool(fleet: FleetClient, pool: str) -> Any:
    return (await fleet.unary(fleet.stub.GetPool, fpb.GetPoolRequest(model_name=MODEL, pool=pool))).pool


async def pool_on(fleet: FleetClient, pool: str, version: int, timeout: float = POOL_TIMEOUT) -> None:
    """Until every member of ``pool`` serves ``version``, READY (at least one member)."""
    deadline = time.monotonic() + timeout
    members: Any = []
    while time.monotonic() < deadline:
        try:
            members = (await get_pool(fleet, pool)).members
        except NotFound:
            members = []
        if members and all(
            m.version == version and m.phase == fpb.RELOAD_PHASE_READY and m.serving for m in members
        ):
            return
        await asyncio.sleep(0.25)
    raise FleetFailure(f"pool {pool} not on {MODEL}:{version} within {timeout:.0f} s: {members}")


async def endpoints(admin: Any) -> dict[str, Any]:
    listed = await admin.ListEndpoints(router_pb.ListEndpointsRequest(), timeout=10)
    return {e.address: e for e in listed.endpoints}


async def router_sees(admin: Any, address: str, version: int, timeout: float = 60) -> None:
    """Until the router lists ``address`` READY with ``version`` loaded."""
    deadline = time.monotonic() + timeout
    found: Any = None
    while time.monotonic() < deadline:
        found = (await endpoints(admin)).get(address)
        if (
            found is not None
            and found.state == router_pb.ENDPOINT_STATE_READY
            and any(m.model.version == version for m in found.models)
        ):
            return
        await asyncio.sleep(0.25)
    raise FleetFailure(f"the router does not list {address} READY on {MODEL}:{version}: {found}")


def summary(fleet: dict[str, Any]) -> str:
    """One line of the fleet checks' numbers for the smoke's closing summary."""
    moved, rolled = fleet["alias_move"], fleet["rollout"]
    judged, percent = [], 0
    for t in rolled["transitions"]:  # a judged window ran at the weight the transition before set
        if t["evidence"] is not None:
            judged.append(f"{percent}% met -> {t['to_state']}")
        percent = t["percent"]
    steps = ", ".join(judged)
    return (
        f"alias move: champion pool rolled in {moved['seconds']:.1f} s (phases {moved['metrics']}); "
        f"rollout {rolled['id']}: {steps} in {rolled['seconds']:.1f} s"
    )


def phase_seconds(metrics_url: str) -> dict[str, float]:
    """The pod's reload phases (seconds summed over its reloads), from its /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    sums = re.findall(
        r'llmops_serving_reload_phase_seconds_sum\{[^}]*phase="(\w+)"[^}]*\} ([0-9.e+-]+)', text
    )
    return {phase: round(float(value), 2) for phase, value in sums}


async def set_alias(registry: RegistryClient, alias: str, version: int) -> None:
    await registry.unary(
        registry.stub.SetAlias, rpb.SetAliasRequest(model_name=MODEL, alias=alias, version=version)
    )


async def alias_move(
    registry_address: str,
    router: str,
    pods: dict[str, str],
    metrics: dict[str, str],
    versions: dict[str, int],
    say: Say,
) -> dict[str, Any]:
    """Moves ``champion`` to the challenger's version under load; ``pods`` maps pool -> pod address."""
    old, new = versions["champion"], versions["challenger"]
    registry = RegistryClient.connect(registry_address, timeout=60)
    fleet = FleetClient.connect(registry_address, timeout=30)
    channel = open_channel(router)
    admin = router_grpc.RouterServiceStub(channel)
    try:
        await pool_on(fleet, "champion", old)
        await pool_on(fleet, "challenger", new)
        for pool, version in (("champion", old), ("challenger", new)):
            await router_sees(admin, pods[pool], version)
        before = int((await endpoints(admin))[pods["challenger"]].requests)
        load = Load(router)
        try:
            for _ in range(600):  # up to 2 minutes for the load to reach the champion pool
                if load.versions[old] >= 4 or load.failures:
                    break
                await asyncio.sleep(0.2)
            if load.versions[old] < 4:
                raise FleetFailure(f"no load on the champion pool before the move: {load.failures[:3]}")
            took = int((await endpoints(admin))[pods["challenger"]].requests) - before
            if took:
                raise FleetFailure(f"the challenger pod took {took} champion requests before the move")
            phases: list[tuple[float, str]] = []
            moved = time.monotonic()
            await set_alias(registry, "champion", new)
            say(f"moved {MODEL}@champion {MODEL}:{old} -> {MODEL}:{new} under load")
            while True:
                pool = await get_pool(fleet, "champion")
                member = pool.members[0] if pool.members else None
                if member is not None:
                    phase = fpb.ReloadPhase.Name(member.phase).removeprefix("RELOAD_PHASE_").lower()
                    if not phases or phases[-1][1] != phase:
                        phases.append((time.monotonic() - moved, phase))
                    if (
                        member.version == new
                        and member.phase == fpb.RELOAD_PHASE_READY
                        and member.serving
                        and len(phases) > 1
                    ):
                        break
                if time.monotonic() - moved > POOL_TIMEOUT:
                    raise FleetFailure(f"the champion pool did not reload to {new}: {pool}")
                await asyncio.sleep(0.1)
            rolled = time.monotonic() - moved
            await router_sees(admin, pods["champion"], new)
            after_champion = int((await endpoints(admin))[pods["champion"]].requests)
            settle = time.monotonic() + 60
            while int((await endpoints(admin))[pods["champion"]].requests) == after_champion:
                if time.monotonic() > settle:
                    raise FleetFailure("the router never sent the reloaded champion pod a request")
                await asyncio.sleep(0.2)
        finally:
            await load.stop()
        took = int((await endpoints(admin))[pods["challenger"]].requests) - before
        reload_phases = phase_seconds(metrics["champion"])
        seen = " -> ".join(f"{phase} (+{at:.1f} s)" for at, phase in phases)
        say(
            f"champion pool pod {pods['champion']}: {seen}; on {MODEL}:{new} READY {rolled:.1f} s after the move"
        )
        say(
            f"its reload phases (pod metrics, seconds; a phase shorter than a pool sync shows only there): {reload_phases}"
        )
        say(
            f"load: {sum(load.versions.values())} answers by version {dict(load.versions)}, "
            f"{len(load.failures)} failed; the challenger pool's pod took {took} champion requests"
        )
        if load.failures:
            raise FleetFailure(
                f"{len(load.failures)} requests failed during the alias move: {load.failures[:5]}"
            )
        if not load.versions[new] or took <= 0:
            raise FleetFailure(f"no champion traffic reached {MODEL}:{new} on the challenger pod ({took})")
        if not {"draining", "unloading", "loading"} <= {phase for _, phase in phases} | set(reload_phases):
            raise FleetFailure(f"the reload's phases are missing: seen {phases}, metrics {reload_phases}")
        return {"seconds": rolled, "phases": phases, "metrics": reload_phases, "answers": dict(load.versions),
                "challenger_took": took}  # fmt: skip
    finally:
        await channel.close(None)
        await fleet.close()
        await registry.close()


async def rollout(
    registry_address: str,
    router: str,
    pods: dict[str, str],
    to_version: int,
    say: Say,
) -> dict[str, Any]:
    """A rollout from the champion to ``to_version`` (already the challenger alias) between the pools."""
    fleet = FleetClient.connect(registry_address, timeout=30)
    rollouts = RolloutClient.connect(registry_address, timeout=30)
    channel = open_channel(router)
    admin = router_grpc.RouterServiceStub(channel)
    try:
        await pool_on(fleet, "challenger", to_version)
        await router_sees(admin, pods["challenger"], to_version)
        case = RolloutCase("kube-smoke", MODEL, to_version, RolloutState.PROMOTED)
        started = time.monotonic()
        result = await follow(rollouts, case, router_traffic(router, MODEL), say, timeout=240)
        took = time.monotonic() - started
        if result["state"] != RolloutState.PROMOTED.value:
            raise FleetFailure(f"the rollout ended {result['state']}: {result['transitions'][-1]['reason']}")
        judged = [t for t in result["transitions"] if t["evidence"] is not None]
        if not judged or any(not all(t["evidence"]["checks"].values()) for t in judged):
            raise FleetFailure(f"the rollout promoted without evidence on each step: {result['transitions']}")
        moved = time.monotonic()
        await pool_on(fleet, "champion", to_version)
        say(
            f"rollout promoted in {took:.1f} s ({result['requests']} requests); the champion pool's pod "
            f"then rolled to {MODEL}:{to_version} in {time.monotonic() - moved:.1f} s"
        )
        return result | {"seconds": took}
    finally:
        await channel.close(None)
        await rollouts.close()
        await fleet.close()
