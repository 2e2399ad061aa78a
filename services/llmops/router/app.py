"""Wires the router: settings -> endpoint pool + discovery -> :class:`Router` -> servicers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import Request
from prometheus_client import CollectorRegistry

from llmops.common.access import Access
from llmops.common.app import ServiceApp
from llmops.common.auth import Identity
from llmops.common.clients import RegistryClient
from llmops.common.errors import InvalidArgument
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.server import ServiceBinding
from llmops.common.settings import RouterSection, Settings
from llmops.proto.router.v1 import router_service_pb2_grpc as rpb_grpc
from llmops.proto.serving.v1 import serving_service_pb2_grpc as pb_grpc
from llmops.router.cached import FrontCache
from llmops.router.discovery import Discovery, DnsDiscovery, StaticDiscovery
from llmops.router.endpoints import Endpoint, EndpointPool, EndpointState
from llmops.router.grpc_app import ROUTER_SERVICE_NAME, SERVING_SERVICE_NAME, RouterAdmin, ServingProxy
from llmops.router.http_app import AuthHook, create_http_app
from llmops.router.metrics import RouterMetrics
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


def _http_auth(access: Access) -> AuthHook | None:
    """``Authorization: Bearer <key>`` checked with the gRPC API's keys and limiter."""
    authenticator, limiter = access.authenticator, access.limiter
    if not authenticator.enabled:
        return None

    async def check(request: Request) -> Identity | None:
        method = "ListModels" if request.url.path.rstrip("/") == "/v1/models" else "Generate"
        identity = authenticator.check(request.headers.items(), SERVING_SERVICE_NAME, method)
        if limiter is not None:
            await limiter.admit_request(identity)
        return identity

    return check


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the gRPC runtime owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


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
        self.discovery: Discovery = build_discovery(s, self.pool)
        self.proxy = ServingProxy(self.router)
        self._access = Access.from_settings(settings)
        self.http = create_http_app(self.router, auth=_http_auth(self._access))
        self.http_port: int | None = None
        self._http_server: _QuietServer | None = None
        self._http_task: asyncio.Task[None] | None = None
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

    async def start_http(self) -> int:
        """Serve the OpenAI API (TLS with the server's certificate when one is set); returns the port."""
        host = self.settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY (see serving)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, self.settings.router.http_port))
        sock.listen(1024)
        sock.setblocking(False)
        self.http_port = int(sock.getsockname()[1])
        tls = self.settings.tls_cert_file is not None and self.settings.tls_key_file is not None
        config = uvicorn.Config(
            self.http,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=str(self.settings.tls_cert_file) if tls else None,
            ssl_keyfile=str(self.settings.tls_key_file) if tls else None,
            timeout_graceful_shutdown=int(self.settings.grace_seconds) or None,
        )
        self._http_server = _QuietServer(config)
        self._http_task = asyncio.create_task(self._http_server.serve(sockets=[sock]), name="router-http")
        while not self._http_server.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on %s:%d%s", host, self.http_port, " (TLS)" if tls else "")
        return self.http_port

    def access(self) -> Access:
        return self._access

    async def close(self) -> None:
        if self._http_server is not None and self._http_task is not None:
            self._http_server.should_exit = True
            with contextlib.suppress(Exception):
                await self._http_task
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
