"""The serving service as a Ray Serve deployment: Ray places and supervises, clients go direct.

Each replica builds the same :class:`~llmops.serving.app.ServingApp` as ``llmops serve serving`` and
runs its own gRPC server (and OpenAI HTTP server) inside the replica. Ray gives the replica its
resources (``num_gpus``, ``num_cpus``; vLLM's Ray executor spreads a large model over several GPUs),
restarts it when ``check_health`` fails, and rolls it on updates. The hot path does not cross Ray:
on Kubernetes the Service selects the pods and clients talk to the replica's own port, because Ray
Serve's gRPC proxy and ingress hops cost several milliseconds per call and batch stream chunks (see
``docs/serving.md`` for the numbers). The deployment still implements the RPCs as methods, so
Serve's own gRPC proxy works too (``Generate``, ``GenerateStream``, ``ListModels``, ``Tokenize``)
when a cluster wants one entry point.

Autoscaling stays off (``num_replicas`` fixed) in :func:`deployment`: on Kubernetes the HPA owns
the replica count, and two autoscalers on one workload fight.

:func:`build_app` is the chart's RayService entry (``serving.autoscaling.mode: rayservice``,
``import_path: llmops.serving.serve_app:build_app``): there Ray Serve autoscales (no HPA), the
args are :class:`ServeAppArgs` (an unknown one is refused), the replica serves no HTTP port of its
own (Serve's HTTP proxy owns 8000 and hands requests to ``__call__``, streamed through), and its
gRPC and metrics servers keep the pod's configured ports (one replica per Ray worker pod).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmops.common.errors import LLMOpsError, Unavailable, status_for
from llmops.common.server import LLMOpsServer, create_server
from llmops.common.settings import Settings
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.app import ServingApp, default_engine_factory
from llmops.serving.config import EngineFactory

#: Import path of ``add_ServingServiceServicer_to_server``, for ``serve.start(grpc_options=...)``.
SERVICER_FUNCTION = "llmops.proto.serving.v1.serving_service_pb2_grpc.add_ServingServiceServicer_to_server"


class _Context:
    """The little of a gRPC servicer context the servicer reads, for calls that come through Ray."""

    def __init__(self, remaining: float | None = None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining


def _context() -> Any:
    return _Context()


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _report(exc: LLMOpsError, grpc_context: Any) -> None:
    if grpc_context is None:
        raise exc
    mapped = status_for(exc)
    grpc_context.set_code(mapped.code)
    grpc_context.set_details(mapped.message)


class ServingDeployment:
    """One serving replica. Wrap it with ``serve.deployment`` (see :func:`deployment`).

    Args:
        env: ``LLMOPS_*`` settings for this replica, over those in the process environment (e.g.
            ``LLMOPS_SERVING_MODEL``, ``LLMOPS_SERVING_ENGINE``, ``LLMOPS_SERVING_PORT``).
        engine_factory: ``module:function`` of an engine factory; the real engines when omitted.
    """

    async def __init__(  # type: ignore[misc]  # Ray actors may construct asynchronously
        self, env: Mapping[str, str] | None = None, engine_factory: str | None = None
    ) -> None:
        inherited = {
            k: v for k, v in os.environ.items() if k.startswith("LLMOPS_") and k != "LLMOPS_TINY_MODEL_CACHE"
        }
        self.settings = Settings.load(env={**inherited, **(env or {})})
        registry = CollectorRegistry()
        factory: EngineFactory = _import(engine_factory) if engine_factory else default_engine_factory
        self.app = ServingApp(self.settings, registry, engine_factory=factory)
        s = self.settings.serving
        self.server: LLMOpsServer
        self.server, port = await create_server(
            f"{self.settings.host}:{s.port}",
            self.app.bindings(),
            self.settings,
            registry=registry,
            metrics_port=s.metrics_port,
            access=self.app.access(),
        )
        await self.app.start()
        await self.server.refresh_readiness()
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::") else _node_ip()
        self._addresses = {
            "grpc": f"{host}:{port}",
            "http": f"http://{host}:{self.app.http_port}" if self.app.http_port else "",
            "metrics": f"http://{host}:{self.server.metrics_http_port}/metrics"
            if self.server.metrics_http_port
            else "",
        }

    async def addresses(self) -> dict[str, str]:
        """Where this replica's own servers listen: ``grpc``, ``http``, ``metrics``."""
        return dict(self._addresses)

    async def check_health(self) -> None:
        """Ray Serve's health probe: a replica without a READY model is restarted."""
        if not await self.app.service.ready():
            raise Unavailable("no model is ready on this replica")

    # --- the RPCs, for Ray Serve's gRPC proxy ------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        try:
            return await self.app.servicer.Generate(request, _context())
        except LLMOpsError as exc:
            _report(exc, grpc_context)
            return pb.GenerateResponse()

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            async for message in self.app.servicer.GenerateStream(request, _context()):
                yield message
        except LLMOpsError as exc:
            _report(exc, grpc_context)

    async def ListModels(
        self, request: pb.ListModelsRequest, grpc_context: Any = None
    ) -> pb.ListModelsResponse:
        return await self.app.servicer.ListModels(request, _context())

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context: Any = None) -> pb.TokenizeResponse:
        try:
            return await self.app.servicer.Tokenize(request, _context())
        except LLMOpsError as exc:
            _report(exc, grpc_context)
            return pb.TokenizeResponse()

    async def __call__(self, request: Any) -> Any:
        """HTTP from Ray Serve's proxy: the OpenAI-compatible API, its response streamed back."""
        from starlette.responses import StreamingResponse

        return await forward_asgi(self.app.http, request.scope, request.receive, StreamingResponse)

    async def __del__(self) -> None:
        """Ray Serve calls this when the replica stops: drain, then free the engines."""
        await self.server.stop()
        await self.app.close()


def _node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def deployment(
    *,
    env: Mapping[str, str] | None = None,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    engine_factory: str | None = None,
    name: str = "llmops-serving",
) -> Any:
    """A bound Serve application of :class:`ServingDeployment` (``serve.run(deployment(...))``).

    Several replicas on one node need ``LLMOPS_SERVING_PORT=0`` (each binds its own port; ask
    ``addresses``); one replica per pod keeps the configured port for the Kubernetes Service.
    """
    from ray import serve

    wrapped: Any = serve.deployment(ServingDeployment)
    return wrapped.options(
        name=name,
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        health_check_period_s=10,
        health_check_timeout_s=30,
    ).bind(env=dict(env or {}), engine_factory=engine_factory)


class ServeAppArgs(BaseModel):
    """The ``args`` of the Serve application, as the chart's rayservice.yaml renders them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="LLMOPS_SERVING_MODEL of every replica.")
    engine: Literal["vllm", "transformers", "tensorrt_llm"] = Field(description="LLMOPS_SERVING_ENGINE.")
    num_gpus: float = Field(default=0, ge=0, description="GPUs of one replica (Ray actor option).")
    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas Serve keeps.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas Serve starts.")
    target_ongoing_requests: int = Field(
        default=8, ge=1, description="Serve's autoscaling target per replica."
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="LLMOPS_SERVING_ENGINE_OPTIONS (e.g. tensor_parallel_size)."
    )


def parse_args(args: dict[str, Any]) -> ServeAppArgs:
    """The args, or ``ValueError`` naming each refused one."""
    try:
        parsed = ServeAppArgs.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"llmops.serving.serve_app args: {problems}") from None
    if parsed.min_replicas > parsed.max_replicas:
        raise ValueError("llmops.serving.serve_app args: min_replicas is above max_replicas")
    return parsed


async def forward_asgi(
    app: Callable[..., Awaitable[None]],
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    response_class: Any,
) -> Any:
    """Run an ASGI app on one request; the response once it starts, its body streamed."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(app(dict(scope), receive, queue.put))
    first = asyncio.ensure_future(queue.get())
    await asyncio.wait({first, task}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        task.result()  # the app's error
        raise RuntimeError("the app ended without a response")
    start = first.result()

    async def body() -> AsyncIterator[bytes]:
        while True:
            message = await queue.get()
            if message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    break
        await task

    headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in start.get("headers", [])}
    headers.pop("content-length", None)  # re-framed by the proxy
    return response_class(body(), status_code=start["status"], headers=headers)


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application of one served model: ``import_path`` of the chart's RayService."""
    from ray import serve

    parsed = parse_args(args)
    env = {
        "LLMOPS_SERVING_MODEL": parsed.model,
        "LLMOPS_SERVING_ENGINE": parsed.engine,
        "LLMOPS_SERVING_HTTP_ENABLED": "false",  # Serve's HTTP proxy owns the port; see __call__
    }
    if parsed.engine_options:
        env["LLMOPS_SERVING_ENGINE_OPTIONS"] = json.dumps(parsed.engine_options)
    wrapped: Any = serve.deployment(ServingDeployment)
    return wrapped.options(
        name="serving",
        ray_actor_options={"num_cpus": 1, "num_gpus": parsed.num_gpus},
        autoscaling_config={
            "min_replicas": parsed.min_replicas,
            "max_replicas": parsed.max_replicas,
            "target_ongoing_requests": parsed.target_ongoing_requests,
        },
        health_check_period_s=10,
        health_check_timeout_s=30,
    ).bind(env=env)
