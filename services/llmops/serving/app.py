"""Wires the serving service: engines, resolver, metrics, gRPC servicer and the OpenAI HTTP server.

``llmops serve serving`` calls :func:`build_app`; the start hook serves the HTTP API on
``serving.http_port`` and loads ``serving.model`` when it is set. Readiness (grpc.health.v1) is true
only while a model is READY. With ``redis_url`` set, generation goes through the response cache
(in process, straight to Redis; see :mod:`llmops.serving.service`); without it there is no cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Request
from prometheus_client import CollectorRegistry

from llmops.common.access import Access
from llmops.common.app import ServiceApp
from llmops.common.auth import Identity
from llmops.common.errors import InvalidArgument
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings
from llmops.proto.serving.v1 import serving_service_pb2_grpc
from llmops.serving.config import EngineFactory, ServingConfig
from llmops.serving.domain import EngineKind, EngineOptions, LoadRequest, ModelRef, ModelSource
from llmops.serving.engines.base import Engine
from llmops.serving.grpc_app import SERVICE_NAME, ServingServicer
from llmops.serving.http_app import AuthHook, create_http_app
from llmops.serving.metrics import EngineMetricsBridge, EngineShimMetrics, ServingMetrics
from llmops.serving.resolver import CompositeResolver, LocalPathResolver, ModelResolver, RegistryResolver
from llmops.serving.service import ServingService
from llmops.serving.validation import Limits

log = logging.getLogger(__name__)


def default_engine_factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> Engine:
    """The real engines, imported only when used (vLLM's import alone takes seconds)."""
    if kind is EngineKind.VLLM:
        from llmops.serving.engines.vllm_engine import VLLMEngine

        return VLLMEngine(path, served_name, options)
    if kind is EngineKind.TRANSFORMERS:
        from llmops.serving.engines.transformers_engine import TransformersEngine

        return TransformersEngine(path, served_name, options)
    if kind is EngineKind.TENSORRT_LLM:
        from llmops.serving.engines.tensorrt_llm_engine import TensorRTLLMEngine

        return TensorRTLLMEngine(path, served_name, options)
    raise InvalidArgument(f"no engine {kind.value!r} on this server", field="engine")


def default_resolver(settings: Settings) -> ModelResolver:
    """Local folders, plus registry references when the registry package is part of this build."""
    registry: ModelResolver | None = None
    if importlib.util.find_spec("llmops.common.artifacts.client") is not None:
        from llmops.common.clients import RegistryClient

        cache = settings.model_cache_dir or settings.data_dir / "serving" / "models"
        registry = RegistryResolver(RegistryClient.connect(settings.registry.address, timeout=600), cache)
    return CompositeResolver(LocalPathResolver(), registry)


def startup_load_request(settings: Settings) -> LoadRequest | None:
    """The LoadRequest for ``serving.model`` (a folder path, or a registry reference)."""
    s = settings.serving
    if not s.model:
        return None
    looks_local = s.model.startswith(("/", ".", "~")) or Path(s.model).expanduser().is_dir()
    source = (
        ModelSource(local_path=s.model) if looks_local else ModelSource(model_ref=ModelRef.parse(s.model))
    )
    try:
        options = EngineOptions(**s.engine_options)
    except TypeError as exc:
        raise InvalidArgument(f"serving.engine_options: {exc}") from None
    return LoadRequest(
        source=source, served_name=s.served_name or "", engine=EngineKind(s.engine), options=options
    )


def http_auth(access: Access) -> AuthHook | None:
    """The OpenAI API's check of ``Authorization: Bearer <key>``, as gRPC's (the same keys and
    limiter): ``/v1/models`` is ListModels, the rest is Generate; each request takes one from the
    tenant's request budget."""
    authenticator, limiter = access.authenticator, access.limiter
    if not authenticator.enabled:
        return None

    async def check(request: Request) -> Identity | None:
        method = "ListModels" if request.url.path.rstrip("/") == "/v1/models" else "Generate"
        identity = authenticator.check(request.headers.items(), SERVICE_NAME, method)
        if limiter is not None:
            await limiter.admit_request(identity)
        return identity

    return check


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the gRPC runtime owns SIGTERM and drains both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class ServingApp(ServiceApp):
    """The serving service hosted on the shared runtime, plus its HTTP server."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        *,
        engine_factory: EngineFactory = default_engine_factory,
        resolver: ModelResolver | None = None,
        auth: AuthHook | None = None,
        http_host: str | None = None,
    ) -> None:
        self.settings = settings
        s = settings.serving
        # parsed now, so a bad serving.model or engine option fails the build (and `serve --check`)
        self._startup_request = startup_load_request(settings)
        shim = EngineShimMetrics()
        config = ServingConfig(
            default_engine=EngineKind(s.engine),
            max_waiting=s.max_waiting,
            limits=Limits(max_tokens=s.max_tokens_limit),
            drain_timeout=s.drain_timeout_seconds,
            alias_poll_seconds=s.alias_poll_seconds,
            replace_unloads_first=s.replace_unloads_first,
        )
        self.cache: ResponseCache | None = None
        if settings.redis_url:
            # the Redis client, only when used
            from llmops.common.response_cache.build import build_response_cache

            self.cache = build_response_cache(settings, registry)
        # one Authenticator and one limiter (one Redis client) for gRPC and HTTP alike
        self._access = Access.from_settings(settings)
        self.service = ServingService(
            engine_factory,
            resolver or default_resolver(settings),
            ServingMetrics(registry),
            shim,
            config,
            cache=self.cache,
            limiter=self._access.limiter,
        )
        registry.register(EngineMetricsBridge(shim, self.service.refresh_engine_gauges))
        self.servicer = ServingServicer(self.service, http_port=lambda: self.http_port)
        self.http = create_http_app(self.service, auth=auth if auth is not None else http_auth(self._access))
        self._http_host = http_host or settings.host
        self._http_server: _QuietServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None

    def bindings(self) -> Sequence[ServiceBinding]:
        return [
            ServiceBinding(
                SERVICE_NAME,
                self.servicer,
                serving_service_pb2_grpc.add_ServingServiceServicer_to_server,
                readiness=self.service.ready,
            )
        ]

    async def start(self) -> None:
        if self.cache is not None:
            from llmops.common.response_cache.build import start_backend

            await start_backend(self.cache)  # fails open: a Redis down now is logged, not fatal
        if self.settings.serving.http_enabled:
            await self.start_http()
        if self._startup_request is not None:
            await self.service.load_model(self._startup_request)

    async def start_http(self) -> int:
        """Serve the OpenAI API; returns the bound port."""
        family = socket.AF_INET6 if ":" in self._http_host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
        # without it Nagle's algorithm meets the client's delayed ACK (+40 ms per response).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._http_host, self.settings.serving.http_port))
        sock.listen(1024)
        sock.setblocking(False)
        self.http_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.http,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(self.settings.grace_seconds) or None,
        )
        self._http_server = _QuietServer(config)
        self._http_task = asyncio.create_task(self._http_server.serve(sockets=[sock]), name="serving-http")
        while not self._http_server.started:
            if self._http_task.done():
                self._http_task.result()  # raises the start-up error
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on %s:%d", self._http_host, self.http_port)
        return self.http_port

    async def stop_http(self) -> None:
        """Stop accepting HTTP requests and let open ones finish (up to the grace period)."""
        if self._http_server is not None and self._http_task is not None:
            self._http_server.should_exit = True
            with contextlib.suppress(Exception):
                await self._http_task
        self._http_server = self._http_task = None

    def access(self) -> Access:
        return self._access

    async def close(self) -> None:
        await self.stop_http()
        await self.service.close()
        if self.cache is not None:
            await self.cache.backend.close()
        await self._access.close()


def build_app(settings: Settings, registry: CollectorRegistry) -> ServiceApp:
    """Entry point of ``llmops serve serving``."""
    return ServingApp(settings, registry)
