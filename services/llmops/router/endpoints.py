"""The replicas the router knows: their channels, health and load, kept fresh by two streams each.

Per replica the pool holds one ``WatchLoad`` stream (serving pushes queued/running/KV per model on
change, at most every ``load_interval_ms``, and a heartbeat when quiet) and one ``grpc.health.v1``
``Watch`` stream on the serving service. A replica is in the rotation (READY) while its health says
SERVING and its last load report is younger than ``stale_ms``; a broken stream takes it out at once,
a silent (stuck) one after ``stale_ms``. Discovery calls :meth:`EndpointPool.set_addresses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmops.common.clients import API_KEY_METADATA, client_security, open_channel
from llmops.common.domain import ResolvedModel
from llmops.proto.serving.v1 import serving_service_pb2 as serving_pb
from llmops.proto.serving.v1 import serving_service_pb2_grpc as serving_grpc

log = logging.getLogger(__name__)

SERVING_SERVICE = "llmops.serving.v1.ServingService"
_READY_STATE = serving_pb.LOADED_MODEL_STATE_READY


class EndpointState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    NOT_READY = "not_ready"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class ModelSlot:
    """One model on a replica, as its last load report said."""

    served_name: str
    model: ResolvedModel | None
    ready: bool
    waiting: int
    running: int
    capacity: int
    kv_cache_usage: float


class Endpoint:
    """One serving replica: its channel, its stub, what it serves and how loaded it is."""

    def __init__(self, address: str, source: str, load_interval_ms: int) -> None:
        self.address = address
        self.source = source
        self.channel: grpc.aio.Channel | None = None
        self.stub: serving_grpc.ServingServiceAsyncStub | None = None
        self.models: dict[str, ModelSlot] = {}
        self.by_name: dict[str, list[ModelSlot]] = {}  # registry model name -> slots
        self.serving = False  # health says SERVING
        self.streaming = False  # the load stream is open
        self.last_report = 0.0  # monotonic time of the last load report
        self.last_report_at: datetime | None = None
        self.http_port = 0
        self.pool = ""  # the replica's serving pool, and its phase there, as its last report said
        self.reload_phase = ""
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.ready = False  # in the rotation (kept by the pool)
        self._interval_ms = load_interval_ms
        self.tasks: list[asyncio.Task[None]] = []

    def connect(self) -> tuple[grpc.aio.Channel, serving_grpc.ServingServiceAsyncStub]:
        """Open the channel (no retry policy: the router retries on another replica itself)."""
        if self.channel is None or self.stub is None:
            self.channel = open_channel(self.address)
            self.stub = serving_grpc.ServingServiceStub(self.channel)  # type: ignore[assignment]
        return self.channel, self.stub

    @property
    def state(self) -> EndpointState:
        if self.ready:
            return EndpointState.READY
        if self.last_report == 0.0 and not self.streaming:
            return EndpointState.CONNECTING if not self.failures else EndpointState.DOWN
        return EndpointState.NOT_READY if self.streaming and not self.serving else EndpointState.DOWN

    def slot(self, served_name: str) -> ModelSlot | None:
        slot = self.models.get(served_name)
        return slot if slot is not None and slot.ready else None

    def load(self, slot: ModelSlot) -> int:
        """Queued plus running: the replica's report, or this router's own count when higher (fresher)."""
        reported = slot.waiting + slot.running
        return reported if reported > self.in_flight else self.in_flight

    def saturated(self, slot: ModelSlot, saturation_waiting: int) -> bool:
        return self.load(slot) >= slot.capacity + saturation_waiting or slot.kv_cache_usage >= 0.98

    def apply(self, report: serving_pb.WatchLoadResponse) -> None:
        models: dict[str, ModelSlot] = {}
        by_name: dict[str, list[ModelSlot]] = {}
        for m in report.models:
            model = (
                ResolvedModel(m.model.name, m.model.version, m.model.alias) if m.HasField("model") else None
            )
            slot = ModelSlot(
                m.served_name,
                model,
                m.state == _READY_STATE,
                m.waiting,
                m.running,
                m.capacity,
                m.kv_cache_usage,
            )
            models[m.served_name] = slot
            if model is not None:
                by_name.setdefault(model.name, []).append(slot)
        self.models, self.by_name = models, by_name
        self.http_port = report.http_port
        self.pool, self.reload_phase = report.pool, report.reload_phase
        self.last_report = time.monotonic()
        self.last_report_at = datetime.now(UTC)


class EndpointPool:
    """Every replica found by discovery, with watchers that keep their state; wakes held requests."""

    def __init__(
        self,
        *,
        load_interval_ms: int = 20,
        stale_ms: int = 1000,
        on_report: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.ready: list[Endpoint] = []  # in the rotation, sorted by address
        self._interval_ms = load_interval_ms
        self._stale = stale_ms / 1000
        self._on_report = on_report
        self._changed = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def start(self) -> None:
        key = client_security().api_key
        self._metadata = ((API_KEY_METADATA, key),) if key else ()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="router-staleness")

    def set_addresses(self, addresses: Iterable[str], source: str) -> None:
        """Make the replicas of ``source`` exactly ``addresses`` (others' stay)."""
        wanted = set(addresses)
        for address in [a for a, e in self.endpoints.items() if e.source == source and a not in wanted]:
            self._remove(address)
        for address in sorted(wanted - set(self.endpoints)):
            endpoint = Endpoint(address, source, self._interval_ms)
            endpoint.connect()
            self.endpoints[address] = endpoint
            endpoint.tasks = [
                asyncio.create_task(self._watch_load(endpoint), name=f"router-load-{address}"),
                asyncio.create_task(self._watch_health(endpoint), name=f"router-health-{address}"),
            ]
            log.info("replica %s added (%s)", address, source)

    def _remove(self, address: str) -> None:
        endpoint = self.endpoints.pop(address)
        for task in endpoint.tasks:
            task.cancel()
        endpoint.ready = False
        self._refresh()
        if endpoint.channel is not None:
            asyncio.get_running_loop().create_task(endpoint.channel.close(None))
        log.info("replica %s removed", address)

    def mark_failed(self, endpoint: Endpoint) -> None:
        """A call found the replica unreachable: out of the rotation until its next load report."""
        endpoint.failures += 1
        endpoint.streaming = False
        endpoint.last_report = min(endpoint.last_report, time.monotonic() - self._stale)
        self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        ready = []
        for endpoint in self.endpoints.values():
            endpoint.ready = (
                endpoint.serving and endpoint.streaming and now - endpoint.last_report < self._stale
            )
            if endpoint.ready:
                ready.append(endpoint)
        ready.sort(key=lambda e: e.address)
        if [e.address for e in ready] != [e.address for e in self.ready]:
            self.ready = ready
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float | None) -> None:
        """Return when the rotation or a replica's models change, or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _watch_load(self, endpoint: Endpoint) -> None:
        request = serving_pb.WatchLoadRequest(
            min_interval_ms=self._interval_ms, heartbeat_ms=max(self._interval_ms, int(self._stale * 250))
        )
        backoff = 0.05
        while True:
            _, stub = endpoint.connect()
            call = stub.WatchLoad(request, metadata=self._metadata)
            try:
                async for report in call:
                    before = {n: s.ready for n, s in endpoint.models.items()}
                    endpoint.apply(report)
                    endpoint.streaming = True
                    backoff = 0.05
                    if self._on_report is not None:
                        self._on_report(endpoint)
                    was_ready = endpoint.ready
                    self._refresh()
                    if was_ready and before != {n: s.ready for n, s in endpoint.models.items()}:
                        self._wake()  # a model came or went on a replica already in the rotation
            except grpc.aio.AioRpcError as exc:
                log.debug("load stream of %s ended: %s", endpoint.address, exc.code().name)
            finally:
                call.cancel()
            endpoint.streaming = False
            self._refresh()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _watch_health(self, endpoint: Endpoint) -> None:
        stub = health_pb2_grpc.HealthStub(endpoint.connect()[0])
        request = health_pb2.HealthCheckRequest(service=SERVING_SERVICE)
        backoff = 0.05
        while True:
            call = stub.Watch(request, metadata=self._metadata)
            try:
                async for answer in call:
                    endpoint.serving = answer.status == health_pb2.HealthCheckResponse.SERVING
                    backoff = 0.05
                    self._refresh()
            except grpc.aio.AioRpcError as exc:
                log.debug("health stream of %s ended: %s", endpoint.address, exc.code().name)
            finally:
                call.cancel()
            endpoint.serving = False
            self._refresh()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _sweep(self) -> None:
        """Stale replicas (no report for ``stale_ms``: stuck, or partitioned) leave the rotation."""
        while True:
            await asyncio.sleep(min(0.1, self._stale / 4))
            self._refresh()

    async def close(self) -> None:
        tasks = [t for e in self.endpoints.values() for t in e.tasks]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for endpoint in self.endpoints.values():
            if endpoint.channel is not None:
                await endpoint.channel.close(None)
        self.endpoints.clear()
        self.ready = []
