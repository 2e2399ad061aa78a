"""A serving replica in a pool: it serves its pool's version and rolls with it, one replica at a time.

The pool record lives in the registry (``llmops.registry.v1.FleetService``): the alias or pinned
version the pool serves, a reload generation (``llmops fleet reload``), and a reload lease. Every
``pool_poll_seconds`` the replica syncs: it reports itself (version, phase, serving) and reads the
pool's target version, resolved by the registry. Then:

- nothing loaded yet (a new replica, one started during a change): it loads the target at once,
  without the lease, since it takes no capacity away;
- loaded version != target, or the generation moved: it takes the lease (compare-and-set in the
  registry; another holder -> WAITING, try again at the next sync) and reloads:
  ``draining`` (readiness NOT_SERVING, so routers and Kubernetes stop sending new requests; after
  ``pool_settle_seconds`` in-flight requests get the rest of ``drain_timeout``), ``unloading`` (the
  old version freed *before* the new one loads: never two copies on the GPU), ``loading``,
  ``settling`` (SERVING again; the lease is held ``pool_settle_seconds`` more so probes and routers
  see it back before the next replica leaves), then releases the lease. The lease is renewed while
  the reload runs; a replica that dies mid-reload loses it when its ttl lapses.

So at most one replica per pool is out of the rotation for a reload: capacity >= replicas - 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmops.common import metric_names as names
from llmops.common.errors import InvalidArgument, LLMOpsError
from llmops.common.settings import Settings
from llmops.proto.registry.v1 import fleet_service_pb2 as fleet_pb
from llmops.serving.domain import LoadRequest, ModelRef, ModelSelector, ModelSource
from llmops.serving.lifecycle import ModelLifecycle

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """A replica's phase; values are the proto enum's names without the prefix, lower case."""

    STARTING = "starting"
    READY = "ready"
    WAITING = "waiting"
    DRAINING = "draining"
    UNLOADING = "unloading"
    LOADING = "loading"
    FAILED = "failed"
    IDLE = "idle"

    @property
    def proto(self) -> int:
        return int(fleet_pb.ReloadPhase.Value(f"RELOAD_PHASE_{self.name}"))


class PoolMetrics:
    """Reload phases (histogram), reloads by outcome, and the version served, per model and pool."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.phase_seconds = Histogram(
            names.SERVING_RELOAD_PHASE_SECONDS,
            "Seconds a pool replica spent in each phase of a rolling reload.",
            names.METRIC_LABELS[names.SERVING_RELOAD_PHASE_SECONDS],
            buckets=names.HISTOGRAM_BUCKETS[names.SERVING_RELOAD_PHASE_SECONDS],
            registry=registry,
        )
        self.reloads = Counter(
            names.SERVING_RELOADS_TOTAL.removesuffix("_total"),
            "Rolling reloads of a pool replica, by outcome.",
            names.METRIC_LABELS[names.SERVING_RELOADS_TOTAL],
            registry=registry,
        )
        self.version = Gauge(
            names.SERVING_POOL_VERSION,
            "The registry version this pool replica serves now (0: none).",
            names.METRIC_LABELS[names.SERVING_POOL_VERSION],
            registry=registry,
        )


def pool_target(ref: ModelRef) -> tuple[str, int]:
    """(alias, 0) or ("", version) of the replica's ``serving.model`` reference."""
    if ref.alias:
        return ref.alias, 0
    if ref.version:
        return "", ref.version
    raise InvalidArgument(
        "a pool replica's serving.model names an alias (name@champion) or a version (name:3)",
        field="serving.model",
    )


class PoolReplica:
    """The loop that keeps one replica on its pool's version (see the module docstring)."""

    def __init__(
        self,
        lifecycle: ModelLifecycle,
        fleet: Any,  # llmops.common.clients.FleetClient
        template: LoadRequest,
        pool: str,
        metrics: PoolMetrics,
        *,
        replica_id: Callable[[], str],
        poll_seconds: float,
        lease_seconds: int,
        settle_seconds: float,
        drain_timeout: float,
    ) -> None:
        ref = template.source.model_ref
        if ref is None:
            raise InvalidArgument(
                "a pool replica serves a registry model, not a folder", field="serving.model"
            )
        self.alias, self.pinned = pool_target(ref)
        self.model_name = ref.name
        self.pool = pool
        self._lifecycle = lifecycle
        self._fleet = fleet
        self._template = template
        self._served_name = template.served_name or ref.name
        self._metrics = metrics
        self._replica_id = replica_id
        self._poll = poll_seconds
        self._lease_seconds = lease_seconds
        self._settle = settle_seconds
        self._drain_timeout = drain_timeout
        self.phase = Phase.STARTING
        self.version = 0
        self.generation = -1  # the pool generation applied; -1 before the first load
        self.accepting = True  # False from draining to settled: readiness says NOT_SERVING
        self.reloads = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._waiting_since = time.monotonic()
        self._reports: set[asyncio.Task[None]] = set()
        metrics.version.labels(self.model_name, pool).set(0)

    # --- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pool-{self.pool}")

    async def close(self) -> None:
        for task in [self._task, *self._reports]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._fleet.close()

    def info(self) -> tuple[str, str]:
        """(pool, phase) for the load reports routers read."""
        return self.pool, self.phase.value

    def poke(self) -> None:
        """Sync now instead of at the next poll (tests, and a reload request)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except LLMOpsError as exc:
                log.warning("pool %s/%s: %s", self.model_name, self.pool, exc.message)
            except Exception:  # the loop must outlive any one bad sync
                log.exception("pool %s/%s: sync failed", self.model_name, self.pool)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    async def _call(self, method: str, request: Any) -> Any:
        return await self._fleet.unary(getattr(self._fleet.stub, method), request)

    def _ids(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "pool": self.pool}

    async def sync(self, phase: Phase | None = None) -> fleet_pb.Pool:
        """Report this replica (in ``phase``, default its phase now) and read the pool (its target
        version resolved now)."""
        phase = phase or self.phase
        target: dict[str, Any] = {"alias": self.alias} if self.alias else {"version": self.pinned}
        member = fleet_pb.PoolMember(
            replica_id=self._replica_id(),
            version=self.version,
            phase=phase.proto,  # type: ignore[arg-type]
            serving=self.accepting and phase is not Phase.FAILED and self.version > 0,
            generation=max(self.generation, 0),
            ttl_seconds=max(5, min(600, int(self._poll * 5) + 1)),
        )
        response = await self._call(
            "SyncPool", fleet_pb.SyncPoolRequest(**self._ids(), **target, member=member)
        )
        pool: fleet_pb.Pool = response.pool
        return pool

    async def step(self) -> None:
        """One sync and whatever it calls for."""
        pool = await self.sync()
        target = pool.target_version
        if target == 0:
            if self.version == 0:
                self._set_phase(Phase.IDLE)
            return  # the alias is gone: keep serving what is loaded
        if self.version == 0:  # nothing serving: a new replica, or one whose load failed
            self.generation = pool.generation
            self._set_phase(Phase.STARTING)
            await self._load(target)
            self._set_phase(Phase.READY)
            await self.sync()
            return
        if target == self.version and pool.generation <= self.generation:
            self._set_phase(Phase.READY)
            return
        granted = await self._call(
            "AcquireReloadLease",
            fleet_pb.AcquireReloadLeaseRequest(
                **self._ids(), holder=self._replica_id(), ttl_seconds=self._lease_seconds
            ),
        )
        if not granted.granted:
            if self.phase is not Phase.WAITING:
                self._waiting_since = time.monotonic()
                log.info(
                    "pool %s/%s: waiting for the reload lease (%s holds it)",
                    self.model_name,
                    self.pool,
                    granted.lease.holder,
                )
            self._set_phase(Phase.WAITING)
            return
        renew = asyncio.create_task(self._renew(), name=f"pool-lease-{self.pool}")
        try:
            if self.phase is Phase.WAITING:
                self._observe("waiting", time.monotonic() - self._waiting_since)
            await self.reload(target, pool.generation)
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew
            with contextlib.suppress(LLMOpsError):
                await self._call(
                    "ReleaseReloadLease",
                    fleet_pb.ReleaseReloadLeaseRequest(**self._ids(), holder=self._replica_id()),
                )

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._lease_seconds / 3)
            with contextlib.suppress(LLMOpsError):
                await self._call(
                    "AcquireReloadLease",
                    fleet_pb.AcquireReloadLeaseRequest(
                        **self._ids(), holder=self._replica_id(), ttl_seconds=self._lease_seconds
                    ),
                )

    # --- the reload -------------------------------------------------------------------------------

    async def reload(self, target: int, generation: int) -> None:
        """Drain, unload, load ``target``, settle; the caller holds the pool's lease."""
        old = self.version
        log.info(
            "pool %s/%s: reloading %s v%d -> v%d (generation %d)",
            self.model_name, self.pool, self._served_name, old, target, generation,
        )  # fmt: skip
        started = time.monotonic()
        try:
            self.accepting = False
            self._set_phase(Phase.DRAINING)
            await self._timed("draining", self._drain())
            self._set_phase(Phase.UNLOADING)
            await self._timed("unloading", self._unload())
            self.version = 0
            self._metrics.version.labels(self.model_name, self.pool).set(0)
            self._set_phase(Phase.LOADING)
            await self._timed("loading", self._load(target))
            self.generation = generation
            self.accepting = True
            self._set_phase(Phase.READY)
            await self._timed("settling", asyncio.sleep(self._settle))
        except BaseException:
            self.accepting = True
            self._metrics.reloads.labels(self.model_name, self.pool, "failed").inc()
            raise
        self.reloads += 1
        self._metrics.reloads.labels(self.model_name, self.pool, "succeeded").inc()
        log.info(
            "pool %s/%s: reload to v%d done in %.1fs",
            self.model_name, self.pool, self.version, time.monotonic() - started,
        )  # fmt: skip

    async def _drain(self) -> None:
        """Out of the rotation; in-flight requests get up to ``drain_timeout`` in all."""
        deadline = time.monotonic() + self._drain_timeout
        await asyncio.sleep(min(self._settle, self._drain_timeout))
        while time.monotonic() < deadline:
            load = next((m for m in self._lifecycle.loads() if m.served_name == self._served_name), None)
            if load is None or load.waiting + load.running == 0:
                return
            await asyncio.sleep(0.05)

    async def _unload(self) -> None:
        if any(m.served_name == self._served_name for m in self._lifecycle.list_models()):
            # what is still running after the drain time is aborted by the unload
            await self._lifecycle.unload(ModelSelector(served_name=self._served_name), 0.0)

    async def _load(self, target: int) -> None:
        ref = ModelRef(self.model_name, alias=self.alias) if self.alias else ModelRef(self.model_name, target)
        request = replace(self._template, source=ModelSource(model_ref=ref), replace=True, no_wait=False)
        try:
            info = await self._lifecycle.load(request)
        except BaseException:
            self._set_phase(Phase.FAILED)
            raise
        self.version = info.model.version if info.model is not None else target
        self._metrics.version.labels(self.model_name, self.pool).set(self.version)

    async def _timed(self, phase: str, work: Awaitable[Any]) -> None:
        started = time.monotonic()
        try:
            await work
        finally:
            self._observe(phase, time.monotonic() - started)

    def _observe(self, phase: str, seconds: float) -> None:
        self._metrics.phase_seconds.labels(self.model_name, self.pool, phase).observe(seconds)
        log.info(
            "pool %s/%s: reload phase %s took %.2fs", self.model_name, self.pool, phase, seconds,
            extra={"event": "reload_phase", "pool": self.pool, "phase": phase, "seconds": round(seconds, 3)},
        )  # fmt: skip

    def _set_phase(self, phase: Phase) -> None:
        if phase is not self.phase:
            log.info(
                "pool %s/%s: %s -> %s", self.model_name, self.pool, self.phase.value, phase.value,
                extra={"event": "pool_phase", "pool": self.pool, "phase": phase.value},
            )  # fmt: skip
            self.phase = phase
            # the registry hears of each phase at once (fleet status, and who is reloading), not at
            # the next poll: the loop itself is busy while it reloads
            task = asyncio.get_running_loop().create_task(self._report(phase))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    async def _report(self, phase: Phase) -> None:
        with contextlib.suppress(LLMOpsError):
            await self.sync(phase)

    async def ready(self) -> bool:
        """This replica's part of readiness: False while a reload has it out of the rotation."""
        return self.accepting


def build_pool_replica(
    settings: Settings, lifecycle: ModelLifecycle, startup: LoadRequest | None, registry: CollectorRegistry
) -> PoolReplica | None:
    """The pool loop for ``serving.pool`` (None when unset); its model is ``serving.model``'s reference."""
    s = settings.serving
    if not s.pool:
        return None
    if startup is None or startup.source.model_ref is None:
        raise InvalidArgument(
            "serving.pool needs serving.model naming a registry alias or version (e.g. llm@champion)",
            field="serving.model",
        )
    from llmops.common.clients import FleetClient

    suffix = uuid.uuid4().hex[:6]
    return PoolReplica(
        lifecycle,
        FleetClient.connect(settings.registry.address, timeout=30),
        startup,
        s.pool,
        PoolMetrics(registry),
        replica_id=lambda: f"{socket.gethostname()}-{suffix}",
        poll_seconds=s.pool_poll_seconds,
        lease_seconds=s.pool_lease_seconds,
        settle_seconds=max(s.pool_settle_seconds, settings.health_poll_seconds * 1.5),
        drain_timeout=s.drain_timeout_seconds,
    )


__all__ = ["Phase", "PoolMetrics", "PoolReplica", "build_pool_replica", "pool_target"]
