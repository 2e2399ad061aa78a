"""The server runtime's interceptor, found wanting by fuzzing (``tests/fuzz``).

Bytes that do not parse as an RPC's request type are the caller's mistake: INVALID_ARGUMENT
(grpc-python alone answers UNKNOWN and logs a traceback), for unary requests and for each message
of a client stream, and well-formed requests pass untouched. A server stream that ends early (the
caller cancelled while a message was being sent) closes the handler's stream at once, so what it
holds (a serving slot) is released then, not whenever the garbage collector gets to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from llmops.common.errors import InvalidArgument, status_for
from llmops.common.metrics import GrpcServerMetrics
from llmops.common.server import _checked, _lenient, _RuntimeInterceptor
from llmops.proto.registry.v1 import registry_service_pb2 as pb

BROKEN = b"\x0a\x7fab"  # field 1, 127 bytes long, 2 given


def test_an_undecodable_request_is_invalid_argument() -> None:
    parse = _lenient(pb.GetModelRequest.FromString)
    assert parse is not None and _lenient(None) is None
    good = pb.GetModelRequest(name="tiny")
    assert _checked(parse(good.SerializeToString())) == good
    with pytest.raises(InvalidArgument, match="malformed request") as error:
        _checked(parse(BROKEN))
    assert status_for(error.value).code is grpc.StatusCode.INVALID_ARGUMENT


async def test_each_message_of_a_client_stream_is_checked() -> None:
    parse = _lenient(pb.RegisterVersionRequest.FromString)
    assert parse is not None
    first = pb.RegisterVersionRequest(metadata=pb.VersionMetadata(model_name="tiny"))

    async def stream() -> AsyncIterator[object]:
        yield parse(first.SerializeToString())
        yield parse(BROKEN)

    received = []
    with pytest.raises(InvalidArgument, match="malformed request"):
        async for message in _checked(stream()):
            received.append(message)
    assert received == [first]


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()

    def code(self) -> None:
        return None


async def test_a_stream_closed_early_closes_the_handlers_stream_at_once() -> None:
    closed: list[str] = []

    async def handler(request: object, context: object) -> AsyncIterator[int]:
        try:
            for i in range(10):
                yield i
        finally:
            closed.append("handler")

    interceptor = _RuntimeInterceptor(GrpcServerMetrics(CollectorRegistry()))
    stream = interceptor._streaming(handler, "svc", "Method")(pb.GetModelRequest(), _Context())
    assert await stream.__anext__() == 0
    await stream.aclose()  # what grpc's finalizer does once the call is cancelled mid-send
    assert closed == ["handler"]  # already, before the loop runs again
