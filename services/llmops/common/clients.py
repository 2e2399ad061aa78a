"""Typed async gRPC clients of every llmops service, used by the CLI, other services and tests.

A client wraps the generated async stub (``client.stub`` is fully typed by the mypy-protobuf stubs)
and adds what every caller needs: a default deadline, the API key in metadata, retries of
``UNAVAILABLE`` through the gRPC service config, and failures turned back into the domain errors of
:mod:`llmops.common.errors` (so ``NotFound`` on the server is ``NotFound`` here)::

    async with RegistryClient.connect(settings.registry.address) as registry:
        version = await registry.unary(registry.stub.GetVersion, GetVersionRequest(...))
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmops.common.errors import (
    LLMOpsError,
    ResourceExhausted,
    Unavailable,
    error_from_status,
    retry_delay_from_metadata,
)
from llmops.proto.cache.v1 import cache_service_pb2_grpc
from llmops.proto.quantization.v1 import quantization_service_pb2_grpc
from llmops.proto.registry.v1 import fleet_service_pb2_grpc, registry_service_pb2_grpc
from llmops.proto.serving.v1 import serving_service_pb2_grpc
from llmops.proto.training.v1 import training_service_pb2_grpc

StubT = TypeVar("StubT")
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

API_KEY_METADATA = "x-api-key"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
    """What every client of this process sends: its API key, and TLS credentials (mTLS with a cert)."""

    api_key: str | None = None
    credentials: grpc.ChannelCredentials | None = None

    @classmethod
    def build(
        cls,
        api_key: str | None,
        ca_file: Path | str | None = None,
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
    ) -> ClientSecurity:
        """TLS is on when ``ca_file`` is set; ``cert_file``/``key_file`` add a client certificate."""
        credentials = None
        if ca_file:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_file).read_bytes(),
                private_key=Path(key_file).read_bytes() if key_file and cert_file else None,
                certificate_chain=Path(cert_file).read_bytes() if key_file and cert_file else None,
            )
        return cls(api_key or None, credentials)

    @classmethod
    def from_settings(cls, settings: Any) -> ClientSecurity:
        key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        return cls.build(key, settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClientSecurity:
        """``LLMOPS_API_KEY`` and ``LLMOPS_TLS_{CA,CERT,KEY}_FILE``: the settings' names."""
        return cls.build(
            env.get("LLMOPS_API_KEY"),
            env.get("LLMOPS_TLS_CA_FILE"),
            env.get("LLMOPS_TLS_CERT_FILE"),
            env.get("LLMOPS_TLS_KEY_FILE"),
        )


_security: ClientSecurity | None = None


def configure_clients(security: ClientSecurity | None) -> None:
    """Set what clients opened without their own key or credentials use (``None``: from the environment)."""
    global _security
    _security = security


def client_security() -> ClientSecurity:
    global _security
    if _security is None:
        _security = ClientSecurity.from_env()
    return _security


def _service_config(service_name: str) -> str:
    # Transparent retries of calls that never reached a handler (connection refused, server draining).
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": service_name}],
                    "retryPolicy": {
                        "maxAttempts": 4,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


#: How often a client pings a connection to keep it alive; servers permit pings this often
#: (:func:`llmops.common.server.server_options`), or they answer GOAWAY "too many pings".
KEEPALIVE_TIME_MS = 30_000


def open_channel(
    address: str,
    service_name: str = "",
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """An ``aio`` channel with our message limits, keepalive and retry policy (TLS per :func:`client_security`)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.enable_retries", 1),
    ]
    if service_name:
        options.append(("grpc.service_config", _service_config(service_name)))
    credentials = credentials if credentials is not None else client_security().credentials
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)


def translate(exc: grpc.aio.AioRpcError) -> LLMOpsError:
    """The domain error matching a failed call's status."""
    error = error_from_status(exc.code(), exc.details() or exc.code().name)
    if isinstance(error, ResourceExhausted):
        error.retry_after_seconds = retry_delay_from_metadata(exc.trailing_metadata())
    return error


class ServiceClient(Generic[StubT]):
    """Base of the typed clients: one service's stub on one channel."""

    service_name: ClassVar[str]
    stub_factory: ClassVar[Any]  # the generated ``<Name>Stub`` class

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout: float | None = 30.0,
        api_key: str | None = None,
        owns_channel: bool = False,
    ) -> None:
        self.channel = channel
        self.stub: StubT = type(self).stub_factory(channel)
        self.timeout = timeout
        api_key = api_key if api_key is not None else client_security().api_key
        self._metadata: tuple[tuple[str, str], ...] = ((API_KEY_METADATA, api_key),) if api_key else ()
        self._owns_channel = owns_channel

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        timeout: float | None = 30.0,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> Self:
        """A client on a channel of its own (closed by :meth:`close` or ``async with``)."""
        channel = open_channel(
            address, cls.service_name, max_message_bytes=max_message_bytes, credentials=credentials
        )
        return cls(channel, timeout=timeout, api_key=api_key, owns_channel=True)

    async def unary(
        self,
        method: Callable[..., Awaitable[ResponseT]],
        request: Any,
        *,
        timeout: float | None = None,
    ) -> ResponseT:
        """Call a unary (or client-streaming, with an iterator as ``request``) RPC."""
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc) from exc

    async def client_stream(
        self,
        method: Callable[..., Awaitable[ResponseT]],
        requests: AsyncIterable[Any],
        *,
        timeout: float | None = None,
    ) -> ResponseT:
        """Call a client-streaming RPC with an async iterable of requests."""
        return await self.unary(method, requests, timeout=timeout)

    async def stream(
        self,
        method: Callable[..., AsyncIterable[ResponseT]],
        request: Any,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[ResponseT]:
        """Iterate a server-streaming RPC; ``timeout=None`` uses no deadline for long watches."""
        call = method(request, timeout=timeout, metadata=self._metadata)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise translate(exc) from exc
        finally:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()

    async def health(self, service: str | None = None) -> int:
        """``grpc.health.v1`` status of this service (or ``service``), e.g. ``HealthCheckResponse.SERVING``."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service=self.service_name if service is None else service)
        response = await self.unary(stub.Check, request, timeout=5)
        return int(response.status)

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> None:
        """Poll health until the service reports SERVING.

        Raises:
            Unavailable: when it is not ready within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: str = "no answer"
        while loop.time() < deadline:
            try:
                status = await self.health()
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except LLMOpsError as exc:
                last = exc.message
            await asyncio.sleep(interval)
        raise Unavailable(f"{self.service_name} not ready after {timeout:.0f}s: {last}")

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@dataclasses.dataclass(frozen=True)
class TrafficSplit:
    """A model's traffic-split weights between its aliases, as :meth:`RegistryClient.get_alias_weights` reads them.

    Attributes:
        model_name: the model.
        revision: the weights' revision (0: never set, no split); pass it as ``expected_revision``
            to change them by compare-and-set.
        weights: alias to weight (>= 0); a share is ``weight / sum``.
        versions: every current alias of the model to the version it points at.
        set_by: who set the weights; empty when never set.
        reason: why, as given.
    """

    model_name: str
    revision: int
    weights: Mapping[str, int]
    versions: Mapping[str, int]
    set_by: str = ""
    reason: str = ""

    def routable(self) -> dict[str, int]:
        """Weights of the aliases that exist and have weight > 0 (what a router draws from)."""
        return {a: w for a, w in self.weights.items() if w > 0 and a in self.versions}


class RegistryClient(ServiceClient["registry_service_pb2_grpc.RegistryServiceAsyncStub"]):
    """Client of ``llmops.registry.v1.RegistryService``.

    ``get_alias_weights`` and ``set_alias_weights`` cover the traffic split a router honours::

        split = await registry.get_alias_weights("llm")  # TrafficSplit(revision=3, weights={...})
        await registry.set_alias_weights("llm", {"champion": 75, "challenger": 25},
                                         expected_revision=split.revision)  # Aborted if it moved
    """

    service_name = "llmops.registry.v1.RegistryService"
    stub_factory = registry_service_pb2_grpc.RegistryServiceStub

    async def get_alias_weights(self, model_name: str, *, timeout: float | None = None) -> TrafficSplit:
        """The model's weights in force and where its aliases point (NotFound: no such model)."""
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        response = await self.unary(
            self.stub.GetAliasWeights, pb.GetAliasWeightsRequest(model_name=model_name), timeout=timeout
        )
        return _split(response.weights, dict(response.alias_versions))

    async def set_alias_weights(
        self,
        model_name: str,
        weights: Mapping[str, int],
        *,
        expected_revision: int | None = None,
        reason: str = "",
        timeout: float | None = None,
    ) -> TrafficSplit:
        """Set the weights as a new revision; with ``expected_revision`` a compare-and-set.

        Raises:
            InvalidArgument: bad weights. NotFound: no such model. FailedPrecondition: an alias
            does not exist. Aborted: the revision is no longer ``expected_revision``.
        """
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        request = pb.SetAliasWeightsRequest(model_name=model_name, weights=dict(weights), reason=reason)
        if expected_revision is not None:
            request.expected_revision = expected_revision
        response = await self.unary(self.stub.SetAliasWeights, request, timeout=timeout)
        versions = (await self.get_alias_weights(model_name, timeout=timeout)).versions
        return _split(response.weights, dict(versions))


def _split(weights: Any, versions: dict[str, int]) -> TrafficSplit:
    return TrafficSplit(
        model_name=str(weights.model_name),
        revision=int(weights.revision),
        weights={str(k): int(v) for k, v in weights.weights.items()},
        versions=versions,
        set_by=str(weights.set_by),
        reason=str(weights.reason),
    )


class FleetClient(ServiceClient["fleet_service_pb2_grpc.FleetServiceAsyncStub"]):
    """Client of ``llmops.registry.v1.FleetService`` (serving pools, hosted by the registry server);
    call the stub with :meth:`ServiceClient.unary`: ``await fleet.unary(fleet.stub.GetPool, request)``."""

    service_name = "llmops.registry.v1.FleetService"
    stub_factory = fleet_service_pb2_grpc.FleetServiceStub


class TrainingClient(ServiceClient["training_service_pb2_grpc.TrainingServiceAsyncStub"]):
    """Client of ``llmops.training.v1.TrainingService``."""

    service_name = "llmops.training.v1.TrainingService"
    stub_factory = training_service_pb2_grpc.TrainingServiceStub


class QuantizationClient(ServiceClient["quantization_service_pb2_grpc.QuantizationServiceAsyncStub"]):
    """Client of ``llmops.quantization.v1.QuantizationService``."""

    service_name = "llmops.quantization.v1.QuantizationService"
    stub_factory = quantization_service_pb2_grpc.QuantizationServiceStub


class ServingClient(ServiceClient["serving_service_pb2_grpc.ServingServiceAsyncStub"]):
    """Client of ``llmops.serving.v1.ServingService``.

    ``generate_text`` and ``stream_text`` cover the common case (one text prompt, one completion)::

        async with ServingClient.connect(settings.serving.address) as serving:
            print(await serving.generate_text("tiny", "def add(a, b):", max_tokens=32, greedy=True))
            async for piece in serving.stream_text("tiny", "def add(a, b):", max_tokens=32):
                print(piece, end="")
    """

    service_name = "llmops.serving.v1.ServingService"
    stub_factory = serving_service_pb2_grpc.ServingServiceStub

    @staticmethod
    def _request(model: str, prompt: str, sampling: dict[str, Any], stream: bool) -> Any:
        from llmops.proto.common.v1 import generation_pb2, sampling_pb2
        from llmops.proto.serving.v1 import serving_service_pb2 as pb

        kind = pb.GenerateStreamRequest if stream else pb.GenerateRequest
        return kind(
            model=pb.ModelSelector(served_name=model),
            prompt=generation_pb2.Prompt(text=prompt),
            sampling=sampling_pb2.SamplingParams(**sampling),
        )

    async def generate_text(
        self, model: str, prompt: str, *, timeout: float | None = None, **sampling: Any
    ) -> str:
        """The text of one completion of ``prompt`` by the served model ``model``.

        ``sampling`` takes ``SamplingParams`` fields (``max_tokens=32``, ``temperature=0.7``, ...).
        """
        response = await self.unary(
            self.stub.Generate, self._request(model, prompt, sampling, False), timeout=timeout
        )
        return str(response.output.completions[0].text)

    async def stream_text(
        self, model: str, prompt: str, *, timeout: float | None = None, **sampling: Any
    ) -> AsyncIterator[str]:
        """The text of one completion as it is generated, piece by piece."""
        request = self._request(model, prompt, sampling, True)
        async for message in self.stream(self.stub.GenerateStream, request, timeout=timeout or self.timeout):
            if message.WhichOneof("event") == "delta" and message.delta.text_delta:
                yield str(message.delta.text_delta)


class CacheClient(ServiceClient["cache_service_pb2_grpc.CacheServiceAsyncStub"]):
    """Client of ``llmops.cache.v1.CacheService``."""

    service_name = "llmops.cache.v1.CacheService"
    stub_factory = cache_service_pb2_grpc.CacheServiceStub


CLIENT_TYPES: dict[str, type[ServiceClient[Any]]] = {
    "registry": RegistryClient,
    "training": TrainingClient,
    "quantization": QuantizationClient,
    "serving": ServingClient,
    "cache": CacheClient,
}
