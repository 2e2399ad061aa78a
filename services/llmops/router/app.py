"""Wires the router: settings -> endpoint pool + discovery -> :class:`Router` -> servicers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from llmops.common.access import Access
from llmops.common.app import ServiceApp
from llmops.common.clients import RegistryClient
from llmops.common.errors import InvalidArgument
from llmops.common.http_server import HttpServer, bearer_auth
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.server import ServiceBinding
from llmops.common.settings import RouterSection, Settings
from llmops.proto.router.v1 import router_service_pb2_grpc as rpb_grpc
from llmops.proto.serving.v1 import serving_service_pb2_grpc as pb_grpc
from llmops.router.cached import FrontCache
from llmops.router.discovery import Discovery, DnsDiscovery, StaticDiscovery
from llmops.router.endpoints import Endpoint, EndpointPool, EndpointState
from llmops.router.grpc_app import ROUTER_SERVICE_NAME, SERVING_SERVICE_NAME, RouterAdmin, ServingProxy
from llmops.router.http_app import create_http_app
from llmops.router.metrics import RouterMetrics
from llmops.router.rollout import RolloutController, build_controller
from llmops.router.service import Router
from llmops.router.split import AliasSplitter

log = logging.getLogger(__name__)


def build_discovery(settings: RouterSection, pool: EndpointPool) -> Discovery:
    """The discoverer ``settings.discovery`` names; a missing parameter fails start-up."""
    if settings.discovery == "static":
        return StaticDiscovery(pool, list(settings.endpoints))
    if settings.discovery == "dns":
        if not settings.dns_name:
            raise InvalidArgument("router.dns_name is required with discovery dns", field="router.dns_name")
        return DnsDiscovery(
            pool, settings.dns_name, settings.replica_port, settings.discovery_refresh_seconds
        )
    from llmops.router.kubernetes import KubernetesDiscovery

    if not settings.kubernetes_service:
        raise InvalidArgument(
            "router.kubernetes_service is required with discovery kubernetes",
            field="router.kubernetes_service",
        )
    return KubernetesDiscovery(
        pool, settings.kubernetes_service, settings.kubernetes_namespace, settings.replica_port
    )


class RouterApp(ServiceApp):
    """The router hosted on the shared runtime."""

    def __init__(self, settings: Settings, registry: CollectorRegistry, *, seed: int | None = None) -> None:
        s = settings.router
        self.settings = settings
        self.metrics = RouterMetrics(registry)
        self.pool = EndpointPool(
            load_interval_ms=s.load_interval_ms, stale_ms=s.stale_ms, on_report=self._reported
        )
        # Replicas by state, counted when Prometheus scrapes (no bookkeeping on every state change).
        for state in EndpointState:
            self.metrics.endpoints.labels(state.value).set_function(functools.partial(self._count, state))
        self.cache: ResponseCache | None = None
        front = None
        if settings.redis_url and s.cache_in_front:
            from llmops.common.response_cache.build import build_response_cache

            self.cache = build_response_cache(settings, registry)
            front = FrontCache(self.cache)
        self.registry: RegistryClient | None = None
        splitter = None
        if s.traffic_split:
            self.registry = RegistryClient.connect(settings.registry.address, timeout=5)
            splitter = AliasSplitter(self.registry.get_alias_weights, s.split_refresh_seconds, seed=seed)
        self.router = Router(self.pool, s, self.metrics, front=front, splitter=splitter, seed=seed)
        self.rollouts: RolloutController | None = None
        if s.rollout_controller:  # steps the registry's rollouts on this router's SLIs
            if self.registry is None:
                self.registry = RegistryClient.connect(settings.registry.address, timeout=5)
            self.rollouts = build_controller(settings, self.registry, self.router.slis)
        self.discovery: Discovery = build_discovery(s, self.pool)
        self.proxy = ServingProxy(self.router)
        self._access = Access.from_settings(settings)
        self.http = create_http_app(self.router, auth=bearer_auth(self._access, SERVING_SERVICE_NAME))
        self.http_port: int | None = None
        self._http_server = HttpServer(self.http, "router")
        self.admin = RouterAdmin(self.router, s.discovery)

    def _count(self, state: EndpointState) -> int:
        return sum(e.state is state for e in list(self.pool.endpoints.values()))

    def _reported(self, endpoint: Endpoint) -> None:
        for slot in endpoint.models.values():
            self.metrics.endpoint_load.labels(endpoint.address, slot.served_name).set(
                slot.waiting + slot.running
            )

    def bindings(self) -> Sequence[ServiceBinding]:
        return [
            ServiceBinding(
                SERVING_SERVICE_NAME, self.proxy, pb_grpc.add_ServingServiceServicer_to_server, self.readiness
            ),
            ServiceBinding(ROUTER_SERVICE_NAME, self.admin, rpb_grpc.add_RouterServiceServicer_to_server),
        ]

    async def readiness(self) -> bool:
        """Ready with one ready replica or more (a router holding requests for a fleet at zero is
        still alive: liveness is the server's own status)."""
        return bool(self.pool.ready)

    async def start(self) -> None:
        if self.cache is not None:
            from llmops.common.response_cache.build import start_backend

            await start_backend(self.cache)  # fails open: Redis down now is logged, not fatal
        self.pool.start()
        await self.discovery.start()
        if self.settings.router.http_enabled:
            await self.start_http()
        if self.rollouts is not None:
            self.rollouts.start()

    async def start_http(self) -> int:
        """Serve the OpenAI API (TLS with the server's certificate when one is set); returns the port."""
        self.http_port = await self._http_server.start(
            self.settings.host,
            self.settings.router.http_port,
            grace_seconds=self.settings.grace_seconds,
            tls_cert_file=self.settings.tls_cert_file,
            tls_key_file=self.settings.tls_key_file,
        )
        return self.http_port

    def access(self) -> Access:
        return self._access

    async def close(self) -> None:
        if self.rollouts is not None:
            await self.rollouts.close()
        await self._http_server.stop()
        await self.http.state.http_client.aclose()
        await self.discovery.close()
        await self.pool.close()
        if self.router.splitter is not None:
            await self.router.splitter.close()
        if self.registry is not None:
            await self.registry.close()
        await self._access.close()
        if self.cache is not None:
            await self.cache.backend.close()


def build_app(settings: Settings, registry: CollectorRegistry) -> ServiceApp:
    """Entry point of ``llmops serve router``."""
    return RouterApp(settings, registry)
