"""Wires the serving service: engines, resolver, metrics, gRPC servicer and the OpenAI HTTP server.

``llmops serve serving`` calls :func:`build_app`; the start hook serves the HTTP API on
``serving.http_port`` and loads ``serving.model`` when it is set. Readiness (grpc.health.v1) is true
only while a model is READY. With ``redis_url`` set, generation goes through the response cache
(in process, straight to Redis; see :mod:`llmops.serving.service`); without it there is no cache.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from llmops.common.access import Access
from llmops.common.app import ServiceApp
from llmops.common.errors import InvalidArgument
from llmops.common.http_server import HttpServer, bearer_auth
from llmops.common.response_cache.cache import ResponseCache
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings
from llmops.proto.serving.v1 import serving_service_pb2_grpc
from llmops.serving.config import EngineFactory, ServingConfig
from llmops.serving.domain import EngineKind, EngineOptions, LoadRequest, ModelRef, ModelSource
from llmops.serving.engines.base import Engine
from llmops.serving.faults import FaultInjector
from llmops.serving.grpc_app import SERVICE_NAME, ServingServicer
from llmops.serving.http_app import AuthHook, create_http_app
from llmops.serving.metrics import EngineMetricsBridge, EngineShimMetrics, ServingMetrics
from llmops.serving.pool import build_pool_replica
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
        from llmops.common.artifacts.direct import DirectFetcher
        from llmops.common.clients import RegistryClient

        cache = settings.model_cache_dir or settings.data_dir / "serving" / "models"
        weights = settings.serving.weights
        fetcher = DirectFetcher(
            shared_mount=weights.shared_mount,
            concurrency=weights.download_concurrency,
            read_timeout=weights.read_timeout_seconds,
        )
        registry = RegistryResolver(
            RegistryClient.connect(settings.registry.address, timeout=600),
            cache,
            source=weights.source,
            fetcher=fetcher,
            url_ttl_seconds=weights.url_ttl_seconds,
            cache_max_bytes=weights.cache_max_bytes,
        )
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
            pool=s.pool,
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
            faults=FaultInjector.from_settings(s.faults),
        )
        registry.register(EngineMetricsBridge(shim, self.service.refresh_engine_gauges))
        self.pool = build_pool_replica(settings, self.service, self._startup_request, registry)
        self.servicer = ServingServicer(
            self.service,
            http_port=lambda: self.http_port,
            pool_info=self.pool.info if self.pool is not None else None,
        )
        self.http = create_http_app(
            self.service, auth=auth if auth is not None else bearer_auth(self._access, SERVICE_NAME)
        )
        self._http_host = http_host or settings.host
        self._http_server = HttpServer(self.http, "serving")
        self._http_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None

    def bindings(self) -> Sequence[ServiceBinding]:
        return [
            ServiceBinding(
                SERVICE_NAME,
                self.servicer,
                serving_service_pb2_grpc.add_ServingServiceServicer_to_server,
                readiness=self.ready,
            )
        ]

    async def ready(self) -> bool:
        """A model READY and, in a pool, not out of the rotation for a reload."""
        return (self.pool is None or await self.pool.ready()) and await self.service.ready()

    async def start(self) -> None:
        if self.service.faults is not None:
            self.service.faults.warn()
        if self.cache is not None:
            from llmops.common.response_cache.build import start_backend

            await start_backend(self.cache)  # fails open: a Redis down now is logged, not fatal
        if self.settings.serving.http_enabled:
            await self.start_http()
        if self.pool is not None:
            self.pool.start()  # the pool loop loads the pool's version now, and follows it
        elif self._startup_request is not None:
            await self.service.load_model(self._startup_request)

    async def start_http(self) -> int:
        """Serve the OpenAI API; returns the bound port."""
        self.http_port = await self._http_server.start(
            self._http_host, self.settings.serving.http_port, grace_seconds=self.settings.grace_seconds
        )
        return self.http_port

    async def stop_http(self) -> None:
        """Stop accepting HTTP requests and let open ones finish (up to the grace period)."""
        await self._http_server.stop()

    def access(self) -> Access:
        return self._access

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        await self.stop_http()
        await self.service.close()
        if self.cache is not None:
            await self.cache.backend.close()
        await self._access.close()


def build_app(settings: Settings, registry: CollectorRegistry) -> ServiceApp:
    """Entry point of ``llmops serve serving``."""
    return ServingApp(settings, registry)
