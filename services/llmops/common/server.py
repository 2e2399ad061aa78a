"""The gRPC server every llmops service runs on.

:func:`create_server` binds a ``grpc.aio`` server with what every service needs:

* ``grpc.health.v1``: the overall status ``""`` is SERVING while the server runs (liveness); each
  service's own name follows its readiness check (e.g. serving is ready only with a model loaded).
* server reflection, so ``grpcurl list`` and ``describe`` work;
* one interceptor that authenticates and authorizes each call (API keys, :mod:`llmops.common.auth`;
  health and reflection stay open), takes it from its tenant's request budget
  (:mod:`llmops.common.ratelimit`), maps domain errors to status codes through
  :mod:`llmops.common.errors` (``INTERNAL`` with a generic message as the last resort) and records
  ``llmops_grpc_server_*`` metrics;
* TLS, and mutual TLS with a client CA, from certificate files in the settings;
* message-size and concurrency limits (over the limit: ``RESOURCE_EXHAUSTED``);
* graceful shutdown: health turns NOT_SERVING, new calls are refused, in-flight calls get
  ``grace_seconds`` to finish; endless watch streams (``Watch*`` methods: health ``Watch``,
  serving's ``WatchLoad``, the job services' ``WatchJob``) end with ``UNAVAILABLE`` once the other
  calls have finished, so a router watching the server does not hold the drain open for the grace;
* a Prometheus ``/metrics`` HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from llmops.common.access import Access
from llmops.common.auth import Authenticator, Identity, acting_as
from llmops.common.clients import KEEPALIVE_TIME_MS
from llmops.common.errors import InvalidArgument, Unavailable, status_for
from llmops.common.metrics import GrpcServerMetrics, MetricsHttpServer, serve_metrics
from llmops.common.ratelimit import RateLimiter
from llmops.common.settings import Settings

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Context = Handler = Any
    Interceptor = grpc.aio.ServerInterceptor
#: grpcio's asyncio health servicer (its stubs do not declare the ``aio`` submodule).
AsyncHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

Readiness = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to host.

    Attributes:
        name: full service name, e.g. ``llmops.registry.v1.RegistryService`` (health and reflection).
        servicer: the servicer instance.
        add_to_server: the generated ``add_<Name>Servicer_to_server`` function.
        readiness: async check for readiness; ``None`` means ready as soon as the server starts.
    """

    name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    readiness: Readiness | None = None


def _split_method(full_method: str) -> tuple[str, str]:
    # "/llmops.registry.v1.RegistryService/GetVersion" -> ("llmops.registry.v1.RegistryService", "GetVersion")
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class _Undecodable:
    """A request whose bytes did not parse; the handler's wrapper answers INVALID_ARGUMENT for it.

    grpc-python parses requests before any interceptor runs and answers UNKNOWN (logging a
    traceback) when parsing fails; a caller's broken bytes are a caller error, so the deserializer
    hands this marker to the wrapper instead of raising.
    """

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or any parse failure of a custom type
            return _Undecodable(exc)

    return deserialize


def _checked(request: Any) -> Any:
    """``request`` as the handler should see it; an undecodable one raises INVALID_ARGUMENT."""
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"malformed request: {request.error}")
    if hasattr(request, "__aiter__"):  # a client stream: check each message as it arrives
        return _checked_stream(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


def is_watch(method: str) -> bool:
    """Whether a method is an endless watch stream (it ends when the watcher or the server goes)."""
    return method.startswith("Watch")


class _Drain:
    """What a drain waits for: the calls in flight that are not watch streams.

    Watch streams never end by themselves, so ``grpc.aio``'s ``stop(grace)`` would wait the whole
    grace for them. They end (``UNAVAILABLE``) once every other call has finished, so watchers see
    NOT_SERVING and the load fall while the work drains, and the server stops as soon as it is done.
    """

    def __init__(self) -> None:
        self.work = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.started = asyncio.Event()  # watch streams end when this is set

    def begin(self, method: str) -> None:
        if not is_watch(method):
            self.work += 1
            self.idle.clear()

    def end(self, method: str) -> None:
        if not is_watch(method):
            self.work -= 1
            if self.work == 0:
                self.idle.set()

    async def end_watches(self, grace: float) -> None:
        """Wait (at most ``grace`` seconds) for the other calls to finish, then end the watches."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.idle.wait()
        self.started.set()

    async def race(self, step: Awaitable[Any]) -> Any:
        """``step``'s result, or :class:`Unavailable` (``step`` cancelled) once the drain starts."""
        task = asyncio.ensure_future(step)
        stop = asyncio.ensure_future(self.started.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise Unavailable("this server is shutting down; watch another replica")
        return task.result()

    async def stream(self, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``items`` until they end, or until the drain starts (then :class:`Unavailable`)."""
        iterator = aiter(items)
        while True:
            try:
                item = await self.race(anext(iterator))
            except StopAsyncIteration:
                return
            yield item


class _RuntimeInterceptor(Interceptor):
    """Authentication, rate limits, error mapping and metrics around every handler."""

    def __init__(
        self,
        metrics: GrpcServerMetrics,
        authenticator: Authenticator | None = None,
        limiter: RateLimiter | None = None,
        drain: _Drain | None = None,
    ) -> None:
        self._metrics = metrics
        self._auth = authenticator if authenticator is not None else Authenticator(None)
        self._limiter = limiter
        self._drain = drain if drain is not None else _Drain()

    async def _admit(self, context: Context, service: str, method: str) -> Identity | None:
        identity = self._auth.check(context.invocation_metadata() or (), service, method)
        if self._limiter is not None:
            await self._limiter.admit_request(identity)
        return identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        service, method = _split_method(handler_call_details.method)
        kwargs = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, service, method), **kwargs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, service, method), **kwargs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, service, method), **kwargs
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, service, method), **kwargs
        )

    def _unary(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: Context) -> Any:
            started = self._begin(service, method)
            failure: BaseException | None = None
            try:
                with acting_as(await self._admit(context, service, method)):
                    result = behavior(_checked(request), context)
                    return await result if asyncio.iscoroutine(result) else result
            except BaseException as exc:
                failure = exc
                await _abort_with(exc, context, service, method)
            finally:
                self._end(service, method, started, context, failure)

        return wrapper

    def _streaming(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: Context) -> AsyncIterator[Any]:
            started = self._begin(service, method)
            failure: BaseException | None = None
            result: Any = None
            try:
                with acting_as(await self._admit(context, service, method)):
                    result = behavior(_checked(request), context)
                    watch = is_watch(method)
                    if hasattr(result, "__aiter__"):
                        async for item in self._drain.stream(result) if watch else result:
                            yield item
                    elif asyncio.iscoroutine(result):
                        # the handler wrote its messages with context.write()
                        await (self._drain.race(result) if watch else result)
                    else:
                        for item in result:
                            yield item
            except BaseException as exc:
                failure = exc
                await _abort_with(exc, context, service, method)
            finally:
                # A call cancelled while its message was being sent leaves the handler's stream
                # suspended at a yield: close it now, or its cleanup (a serving slot, say) waits for
                # the garbage collector.
                if hasattr(result, "aclose"):
                    await result.aclose()
                self._end(service, method, started, context, failure)

        return wrapper

    def _begin(self, service: str, method: str) -> float:
        self._drain.begin(method)
        self._metrics.in_flight.labels(service, method).inc()
        return time.perf_counter()

    def _end(
        self,
        service: str,
        method: str,
        started: float,
        context: Context,
        failure: BaseException | None,
    ) -> None:
        self._drain.end(method)
        self._metrics.in_flight.labels(service, method).dec()
        self._metrics.handling_seconds.labels(service, method).observe(time.perf_counter() - started)
        self._metrics.handled.labels(service, method, _final_code(context, failure).name).inc()


def _final_code(context: Context, failure: BaseException | None) -> grpc.StatusCode:
    if isinstance(failure, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions keep the raw integer
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK if failure is None else grpc.StatusCode.INTERNAL


async def _abort_with(exc: BaseException, context: Context, service: str, method: str) -> NoReturn:
    if isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit)):
        raise exc  # the handler aborted with its own status, or the client went away
    mapped = status_for(exc)
    if mapped.error_id is not None:
        log.error(
            "unexpected error in %s/%s (error id %s)",
            service,
            method,
            mapped.error_id,
            exc_info=exc,
            extra={"fields": {"service": service, "method": method, "error_id": mapped.error_id}},
        )
    await context.abort(mapped.code, mapped.message, trailing_metadata=mapped.trailing_metadata)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from ``tls_cert_file``/``tls_key_file``; with ``tls_client_ca_file``, clients must present a
    certificate that CA signed (mutual TLS). ``None``: plaintext."""
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        if settings.tls_client_ca_file is not None:
            raise ValueError(
                "tls_client_ca_file needs tls_cert_file and tls_key_file (mutual TLS is TLS first)"
            )
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ValueError("TLS needs both tls_cert_file and tls_key_file")
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class LLMOpsServer:
    """A running service: the gRPC server, its health state and its /metrics endpoint."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        port: int,
        bindings: Sequence[ServiceBinding],
        health_servicer: Any,
        settings: Settings,
        registry: CollectorRegistry,
        metrics_port: int | None,
        owned_access: Access | None = None,
        drain: _Drain | None = None,
    ) -> None:
        self.grpc_server = grpc_server
        self._drain = drain if drain is not None else _Drain()
        self.port = port
        self.bindings = tuple(bindings)
        self.health = health_servicer
        self.settings = settings
        self.registry = registry
        self._metrics_port = metrics_port
        self._owned_access = owned_access
        self.metrics_server: MetricsHttpServer | None = None
        self._readiness_task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._signal_stop: asyncio.Future[None] | None = None

    @property
    def metrics_http_port(self) -> int | None:
        """Port of /metrics, or ``None`` when no metrics endpoint was asked for."""
        return self.metrics_server.port if self.metrics_server else None

    async def start(self) -> None:
        await self.grpc_server.start()
        if self._metrics_port is not None:
            self.metrics_server = serve_metrics(self.settings.host, self._metrics_port, self.registry)
        for binding in self.bindings:
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if binding.readiness
                else health_pb2.HealthCheckResponse.SERVING
            )
            await self.health.set(binding.name, status)
        if any(b.readiness for b in self.bindings):
            await self.refresh_readiness()
            self._readiness_task = asyncio.create_task(self._poll_readiness(), name="llmops-readiness")

    async def set_ready(self, service_name: str, ready: bool) -> None:
        """Set one service's readiness in grpc.health.v1 by hand."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(service_name, status)

    async def refresh_readiness(self) -> None:
        """Run every readiness check once and publish the results."""
        for binding in self.bindings:
            if binding.readiness is None:
                continue
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that
                # arrives as the check completes, and stop() would then wait on the poller forever.
                async with asyncio.timeout(self.settings.health_poll_seconds * 5):
                    ready = bool(await binding.readiness())
            except Exception:
                log.warning("readiness check of %s failed", binding.name, exc_info=True)
                ready = False
            await self.set_ready(binding.name, ready)

    async def _poll_readiness(self) -> None:
        while self._stopping is None:
            await asyncio.sleep(self.settings.health_poll_seconds)
            await self.refresh_readiness()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, give in-flight calls ``grace`` seconds."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(
                self._stop(self.settings.grace_seconds if grace is None else grace)
            )
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness_task
        await self.health.enter_graceful_shutdown()
        log.info("draining: grace %.1fs", grace)
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace))  # new calls are refused now
        await self._drain.end_watches(grace)
        await stopping
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
            self.metrics_server = None
        if self._owned_access is not None:  # the limiter's Redis client
            await self._owned_access.close()

    def install_signal_handlers(self) -> None:
        """Drain on SIGTERM or SIGINT (Kubernetes sends SIGTERM before it kills a pod)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, partial(self._on_signal, sig))

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        self._signal_stop = asyncio.ensure_future(self.stop())

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping


class _StringifyArgs(logging.Filter):
    """Turns a record's arguments into its message text as it is logged.

    grpc's ``AioServer.__dealloc__`` logs, at DEBUG, ``"... %s with status %d", self, status`` for a
    server that never started. A handler that keeps records (pytest's caplog, a buffer) then holds
    a pointer to memory the server's deallocation frees right after, and the next garbage
    collection pass that walks the record's ``args`` crashes the interpreter. Formatting the text
    while the object still lives leaves the record holding only a string.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg, record.args = record.getMessage(), ()
        return True


def _guard_grpc_log_records() -> None:
    logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _StringifyArgs) for f in logger.filters):
        logger.addFilter(_StringifyArgs())


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments of every server: message limits, no port sharing, and keepalive pings from
    our clients (every ``KEEPALIVE_TIME_MS``) allowed even on a stream that sends nothing for
    minutes (a job watch); grpc's default allowance (one per 5 minutes) answers them with GOAWAY
    "too many pings" and the watch breaks with UNAVAILABLE."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 3),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def _discard(grpc_server: grpc.aio.Server) -> None:
    """Shut down a server that failed to come up, in the loop that built it.

    grpc.aio binds its completion queue to each event loop that makes a grpc object and delivers a
    server's completions to the loop it was made on. Left to the garbage collector, a half-built
    server is freed at some later moment, from whatever loop runs then (possibly after its own loop
    was closed); stopping it here ends its life where it began.
    """
    with contextlib.suppress(Exception):
        await grpc_server.stop(None)


async def create_server(
    address: str,
    bindings: Sequence[ServiceBinding],
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    metrics_port: int | None = None,
    access: Access | None = None,
) -> tuple[LLMOpsServer, int]:
    """Bind and start a server hosting ``bindings`` on ``address`` (``host:0`` picks a free port).

    Args:
        address: ``host:port`` to bind.
        bindings: the services to host.
        settings: message limits, concurrency, grace period, health polling.
        registry: where metrics are registered (a fresh registry when omitted).
        metrics_port: port of the /metrics endpoint (0 picks a free one; ``None`` serves none).
        access: the process's API keys and rate limiter, when the app already uses them (its HTTP
            API); the caller closes it. ``None``: the server builds its own from ``settings`` and
            closes it when it stops.

    Returns:
        The started server and the port it bound.
    """
    # Settings that cannot work are refused before any grpc object exists: a grpc.aio server built
    # and then dropped unstarted is freed later by the garbage collector, from whatever loop and
    # gRPC generation is current then (see _discard).
    credentials = server_credentials(settings)
    _guard_grpc_log_records()
    registry = registry if registry is not None else CollectorRegistry()
    metrics = GrpcServerMetrics(registry)
    options = server_options(settings)
    owned_access = None
    if access is None:
        access = owned_access = Access.from_settings(settings)
    drain = _Drain()
    grpc_server = grpc.aio.server(
        interceptors=[_RuntimeInterceptor(metrics, access.authenticator, access.limiter, drain)],
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    try:
        health_servicer = AsyncHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        for binding in bindings:
            binding.add_to_server(binding.servicer, grpc_server)
        service_names = [b.name for b in bindings]
        service_names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(service_names, grpc_server)
        if credentials is not None:
            port = grpc_server.add_secure_port(address, credentials)
        else:
            port = grpc_server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind gRPC server to {address}")
        server = LLMOpsServer(
            grpc_server,
            port,
            bindings,
            health_servicer,
            settings,
            registry,
            metrics_port,
            owned_access,
            drain,
        )
        await server.start()
    except BaseException:
        await _discard(grpc_server)
        if owned_access is not None:
            await owned_access.close()
        raise
    log.info("serving %s on port %d", ", ".join(b.name for b in bindings) or "health only", port)
    return server, port
