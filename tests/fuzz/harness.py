"""Calling every RPC of a service with fuzzed input, and judging the answers.

Every RPC is found in the generated descriptors (``DESCRIPTOR.services_by_name``), streaming ones
included: a server stream is read to its end or up to :data:`MAX_STREAM_MESSAGES` messages (then
we cancel it, which is ours and counts as answered), a client stream gets the fuzzed messages in
order. Every call has a deadline. :class:`Tally` counts inputs and disallowed statuses per service
for the session summary (``fuzz: <service> N inputs, M disallowed statuses``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.fuzz.seeding import Seed, database_dir, randomized

Code = grpc.StatusCode

#: What any RPC may answer to any input: success or a caller-error status. ``UNAVAILABLE``,
#: ``INTERNAL``, ``UNKNOWN``, ``DATA_LOSS`` and ``UNIMPLEMENTED`` (every RPC is implemented) are
#: never right for bad input; ``DEADLINE_EXCEEDED`` and ``CANCELLED`` are allowed per RPC only.
ALLOWED: frozenset[Code] = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.FAILED_PRECONDITION,
        Code.OUT_OF_RANGE,
        Code.RESOURCE_EXHAUSTED,
        Code.PERMISSION_DENIED,
        Code.UNAUTHENTICATED,
        Code.ABORTED,
    }
)
#: Messages read from a server stream before we cancel it.
MAX_STREAM_MESSAGES = 8
#: ``LLMOPS_FUZZ_EXAMPLES`` (``make fuzz``) scales every RPC's budget; unset, the ``make test`` one.
EXAMPLES_ENV = "LLMOPS_FUZZ_EXAMPLES"


def budget(default: int) -> settings:
    """Hypothesis settings of one fuzz test, no per-example deadline: under ``make test`` the same
    inputs every run and no example database; under ``make fuzz`` new inputs from the printed seed,
    failing ones kept in ``build/hypothesis`` (:mod:`tests.fuzz.seeding`)."""
    examples = int(os.environ.get(EXAMPLES_ENV, "0") or 0) or default
    fresh = randomized()
    return settings(
        max_examples=examples,
        derandomize=not fresh,
        database=DirectoryBasedExampleDatabase(str(database_dir())) if fresh else None,
        deadline=None,
        print_blob=False,
        # A fresh test-class instance per RPC is a "different executor"; each RPC has its own
        # database key (tests.fuzz.seeding), so examples do not mix across RPCs.
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.differing_executors,
        ],
    )


@dataclass
class Counts:
    inputs: int = 0
    disallowed: int = 0
    codes: dict[str, int] = field(default_factory=dict)


class Tally:
    """Inputs tried and disallowed answers, per service, over the whole session."""

    counts: dict[str, Counts] = {}  # one tally per test session, read by the summary hook

    @classmethod
    def record(cls, service: str, code: Code, allowed: bool) -> None:
        counts = cls.counts.setdefault(service, Counts())
        counts.inputs += 1
        counts.codes[code.name] = counts.codes.get(code.name, 0) + 1
        if not allowed:
            counts.disallowed += 1

    @classmethod
    def lines(cls) -> list[str]:
        total = Counts()
        lines = []
        for service, c in sorted(cls.counts.items()):
            codes = ", ".join(f"{k} {v}" for k, v in sorted(c.codes.items(), key=lambda kv: -kv[1]))
            lines.append(
                f"fuzz: {service}: {c.inputs:,} inputs, {c.disallowed} disallowed statuses ({codes})"
            )
            total.inputs += c.inputs
            total.disallowed += c.disallowed
        if cls.counts:
            lines.append(f"fuzz: {total.inputs:,} inputs, {total.disallowed} disallowed statuses")
        seed = Seed.line()
        return [seed, *lines] if seed and lines else lines


def service_descriptor(module: ModuleType) -> ServiceDescriptor:
    """The one service of a generated ``*_service_pb2`` module."""
    (service,) = module.DESCRIPTOR.services_by_name.values()
    return service


def methods(module: ModuleType) -> list[MethodDescriptor]:
    return list(service_descriptor(module).methods)


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def kind(method: MethodDescriptor) -> str:
    return {
        (False, False): "unary_unary",
        (True, False): "stream_unary",
        (False, True): "unary_stream",
        (True, True): "stream_stream",
    }[(method.client_streaming, method.server_streaming)]


@dataclass(frozen=True)
class Answer:
    code: Code
    details: str
    messages: int  # responses received (server streams)


async def call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Message | Sequence[Message] | bytes | Sequence[bytes],
    *,
    timeout: float,
    address: str,
    max_messages: int = MAX_STREAM_MESSAGES,
) -> Answer:
    """Call ``method`` with ``request`` (a sequence for a client stream; raw bytes skip serializing).

    A server stream is read to its end or to ``max_messages`` and then cancelled by us: that counts
    as ``OK``, since the server answered every message it was asked for.

    A client stream goes through grpc's sync API on a thread: when a server ends a client stream
    early (a refused first message), the asyncio client may report its own ``INTERNAL: Internal
    error from Core`` instead of the server's status (grpc/grpc#36066); the sync client reports
    what the server sent.
    """
    raw = isinstance(request, bytes) or (
        isinstance(request, (list, tuple)) and bool(request) and isinstance(request[0], bytes)
    )
    response_type = message_factory.GetMessageClass(method.output_type)
    serializer = None if raw else _serialize
    deserializer = None if raw else response_type.FromString
    if method.client_streaming and not method.server_streaming:
        items = list(request) if isinstance(request, (list, tuple)) else [request]
        return await asyncio.to_thread(_sync_stream_unary, address, path(method), items, serializer, timeout)
    factory = getattr(channel, kind(method))
    stub = factory(path(method), request_serializer=serializer, response_deserializer=deserializer)
    received = 0
    try:
        if not method.server_streaming:
            argument = _stream(request) if method.client_streaming else request
            await stub(argument, timeout=timeout)
            return Answer(Code.OK, "", 1)
        argument = _stream(request) if method.client_streaming else request
        responses = stub(argument, timeout=timeout)
        async for _ in responses:
            received += 1
            if received >= max_messages:
                responses.cancel()
                return Answer(Code.OK, "", received)
        return Answer(Code.OK, "", received)
    except grpc.aio.AioRpcError as exc:
        return Answer(exc.code(), exc.details() or "", received)


def _sync_stream_unary(
    address: str, method_path: str, items: list[object], serializer: object, timeout: float
) -> Answer:
    with grpc.insecure_channel(address) as channel:
        stub = channel.stream_unary(method_path, request_serializer=serializer, response_deserializer=None)  # type: ignore[arg-type]
        try:
            stub(iter(items), timeout=timeout)
        except grpc.RpcError as exc:
            return Answer(exc.code(), exc.details() or "", 0)  # type: ignore[attr-defined]
    return Answer(Code.OK, "", 1)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


async def _stream(items: object) -> object:
    for item in items if isinstance(items, (list, tuple)) else [items]:
        yield item


def judge(service: str, method: MethodDescriptor, answer: Answer, extra: Iterable[Code] = ()) -> str | None:
    """Record ``answer``; return why it is wrong, or ``None`` when it is allowed."""
    allowed_codes = ALLOWED | frozenset(extra)
    problem = None
    if answer.code not in allowed_codes:
        problem = f"{method.name} answered {answer.code.name}: {answer.details!r}"
    elif answer.code != Code.OK and not answer.details.strip():
        problem = f"{method.name} answered {answer.code.name} with an empty message"
    Tally.record(service, answer.code, problem is None)
    return problem


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
