"""The OpenAI-compatible HTTP API beside a service's gRPC server: the bearer check and the server.

Serving and the router both answer HTTP next to gRPC, on the same event loop, with the same keys
and limiter as their gRPC API; this is the one place that runs such a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Request

from llmops.common.access import Access
from llmops.common.auth import Identity

log = logging.getLogger(__name__)

AuthHook = Callable[[Request], Awaitable[Identity | None]]


def bearer_auth(access: Access, service_name: str) -> AuthHook | None:
    """The OpenAI API's check of ``Authorization: Bearer <key>``, as gRPC's (the same keys and
    limiter): ``/v1/models`` is ListModels, the rest is Generate; each request takes one from the
    tenant's request budget. None where authentication is off."""
    authenticator, limiter = access.authenticator, access.limiter
    if not authenticator.enabled:
        return None

    async def check(request: Request) -> Identity | None:
        method = "ListModels" if request.url.path.rstrip("/") == "/v1/models" else "Generate"
        identity = authenticator.check(request.headers.items(), service_name, method)
        if limiter is not None:
            await limiter.admit_request(identity)
        return identity

    return check


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the gRPC runtime owns SIGTERM and drains both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class HttpServer:
    """One ASGI app served on its own socket in the running event loop."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.name = name
        self.port: int | None = None
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(
        self,
        host: str,
        port: int,
        *,
        grace_seconds: float,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
    ) -> int:
        """Bind ``host:port`` (0: any free port), serve until :meth:`stop`; returns the bound port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
        # without it Nagle's algorithm meets the client's delayed ACK (+40 ms per response).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        tls = tls_cert_file is not None and tls_key_file is not None
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=str(tls_cert_file) if tls else None,
            ssl_keyfile=str(tls_key_file) if tls else None,
            timeout_graceful_shutdown=int(grace_seconds) or None,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"{self.name}-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the start-up error
            await asyncio.sleep(0.01)
        log.info(
            "%s: OpenAI-compatible HTTP API on %s:%d%s", self.name, host, self.port, " (TLS)" if tls else ""
        )
        return self.port

    async def stop(self) -> None:
        """Stop accepting requests and let open ones finish (up to the grace period)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        self._server = self._task = None
