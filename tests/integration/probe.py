"""A probe service for testing the shared runtime through a real server.

It is registered with generic handlers (raw bytes in and out) so the runtime is tested apart from
any one service's protos. ``Raise`` raises the error named in the request; ``Echo`` sleeps for the
number of seconds in the request and echoes it; ``Stream`` yields N items then raises the error named.
Run as a script it hosts the probe through :func:`llmops.common.app.run_app`, like ``llmops serve``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
from prometheus_client import CollectorRegistry

from llmops.common import errors
from llmops.common.app import ServiceApp, run_app
from llmops.common.server import ServiceBinding
from llmops.common.settings import Settings

SERVICE = "llmops.test.v1.ProbeService"


def _identity(data: bytes) -> bytes:
    return data


def raise_named(name: str) -> None:
    if name == "ok":
        return
    if name == "ValueError":
        raise ValueError("secret internal detail: password=hunter2")
    if name == "ResourceExhausted":
        raise errors.ResourceExhausted("too busy", retry_after_seconds=2.5)
    if name == "InvalidArgumentField":
        raise errors.InvalidArgument("must be positive", field="max_tokens")
    if name == "Abort":
        raise KeyError("unreachable")
    cls = getattr(errors, name)
    raise cls(f"{name} raised on purpose")


class ProbeServicer:
    def __init__(self) -> None:
        self.calls = 0

    async def raise_(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        name = request.decode()
        if name == "Abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted by handler")
        raise_named(name)
        return b"ok"

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        await asyncio.sleep(float(request.decode() or 0))
        return request

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls += 1
        count, _, name = request.decode().partition(":")
        for i in range(int(count)):
            yield str(i).encode()
        raise_named(name or "ok")


def add_probe(servicer: ProbeServicer, server: grpc.aio.Server) -> None:
    handlers = {
        "Raise": grpc.unary_unary_rpc_method_handler(servicer.raise_, _identity, _identity),
        "Echo": grpc.unary_unary_rpc_method_handler(servicer.echo, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(servicer.stream, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class ProbeApp(ServiceApp):
    def __init__(self) -> None:
        self.servicer = ProbeServicer()
        self.ready = True

    def bindings(self) -> Sequence[ServiceBinding]:
        return [ServiceBinding(SERVICE, self.servicer, add_probe, readiness=self._ready)]

    async def _ready(self) -> bool:
        return self.ready


def build_app(settings: Settings, registry: CollectorRegistry) -> ServiceApp:
    return ProbeApp()


def main() -> None:
    settings = Settings.load()

    def announce(server: object) -> None:
        print(f"listening grpc={server.port} metrics={server.metrics_http_port}", flush=True)  # type: ignore[attr-defined]

    asyncio.run(run_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0, on_started=announce))
    print("exited cleanly", flush=True)


if __name__ == "__main__":
    sys.exit(main())
