"""Replicas from the Kubernetes API: the EndpointSlices of one Service, watched with the
``kubernetes`` client (the chart's Role grants list and watch on endpointslices, nothing more).

The watch runs on a thread (the client is synchronous) and hands each new address set to the
event loop. An endpoint counts while its ``ready`` condition is true or unset (unset means ready,
per the EndpointSlice API); terminating endpoints report ready false and drop out. The port is the
slice's port named ``grpc``, else the only port, else ``replica_port``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from llmops.router.discovery import Discovery
from llmops.router.endpoints import EndpointPool

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def slice_addresses(endpoint_slice: Any, default_port: int) -> set[str]:
    """host:port of every ready endpoint of one EndpointSlice (a ``V1EndpointSlice``)."""
    ports = list(endpoint_slice.ports or [])
    named = [p.port for p in ports if p.name == "grpc" and p.port]
    port = named[0] if named else (ports[0].port if len(ports) == 1 and ports[0].port else default_port)
    found = set()
    for endpoint in endpoint_slice.endpoints or []:
        conditions = endpoint.conditions
        if conditions is not None and conditions.ready is False:
            continue
        for address in endpoint.addresses or []:
            found.add(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    return found


class SliceTable:
    """The Service's slices by name; folds watch events into the union of their addresses."""

    def __init__(self, default_port: int) -> None:
        self.default_port = default_port
        self.slices: dict[str, set[str]] = {}

    def apply(self, event_type: str, endpoint_slice: Any) -> set[str]:
        name = endpoint_slice.metadata.name
        if event_type == "DELETED":
            self.slices.pop(name, None)
        else:  # ADDED, MODIFIED
            self.slices[name] = slice_addresses(endpoint_slice, self.default_port)
        return self.addresses()

    def addresses(self) -> set[str]:
        return set().union(*self.slices.values()) if self.slices else set()


class KubernetesDiscovery(Discovery):
    """Watches the EndpointSlices of a Service (``kubernetes.io/service-name=<service>``), or of
    every Service a label selector picks (``service`` holding ``=``, e.g. the chart's serving Services)."""

    name = "kubernetes"

    def __init__(self, pool: EndpointPool, service: str, namespace: str, port: int) -> None:
        super().__init__(pool)
        self.service = service
        self.namespace = namespace or (
            NAMESPACE_FILE.read_text().strip() if NAMESPACE_FILE.exists() else "default"
        )
        self.table = SliceTable(port)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._watch, args=(loop,), name="router-endpointslices", daemon=True
        )
        self._thread.start()

    async def run(self) -> None:  # pragma: no cover - the thread does the work
        return

    def _publish(self, loop: asyncio.AbstractEventLoop, addresses: set[str]) -> None:
        loop.call_soon_threadsafe(self.pool.set_addresses, addresses, self.name)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        # the client's own annotations are partial: use it untyped
        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
        watch: Any = importlib.import_module("kubernetes.watch")
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.DiscoveryV1Api()
        # a Service name, or a label selector over several Services' slices (slices copy their labels)
        selector = self.service if "=" in self.service else f"{SERVICE_LABEL}={self.service}"
        while not self._stop.is_set():
            try:
                listed = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
                self.table.slices.clear()
                for item in listed.items:
                    self.table.apply("ADDED", item)
                self._publish(loop, self.table.addresses())
                stream = watch.Watch().stream(
                    api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=60,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    self._publish(loop, self.table.apply(event["type"], event["object"]))
            except Exception as exc:  # API server away, 410 Gone: list again after a pause
                log.warning("EndpointSlice watch of %s/%s failed: %s", self.namespace, self.service, exc)
                time.sleep(1.0)

    async def close(self) -> None:
        self._stop.set()  # the thread ends at its next event or watch timeout (a daemon thread)
