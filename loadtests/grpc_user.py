"""A Locust user that calls gRPC services and reports every call as a Locust request.

gRPC must be made gevent-friendly (``grpc.experimental.gevent.init_gevent()``) before the first
channel exists; the locustfile does that when Locust imports it. Every call carries a deadline, so
a server that stops answering shows up as ``DEADLINE_EXCEEDED`` failures, never as a hung user.

Entries in Locust's statistics (and its CSV ``Type`` column):

* ``grpc`` ``<service>.<Rpc>``: one per call, the whole call's time; a failure carries ``CODE: details``.
  A generation answered from the response cache is its own entry, ``<name> (cached)``, so hits and
  engine answers keep separate percentiles. The "size" column counts tokens for generations.
* ``token`` ``TTFT`` and ``ITL``: measured from the stream itself (see :mod:`loadtests.stream_timing`),
  one ``TTFT`` per stream with a token and one ``ITL`` per gap between token deltas; ``(cached)``
  entries again for replayed cache hits. They never fail: a failed stream is a failed ``grpc`` entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from locust import User
from locust.env import Environment

from loadtests.rpc import RpcFailure, open_channel
from loadtests.stream_timing import StreamTimer
from loadtests.thresholds import RPC_TYPE, TOKEN_TYPE

CACHED_SUFFIX = " (cached)"


class IncompleteStream(Exception):
    """A stream that closed without its ``end`` message."""


class GrpcUser(User):
    """Base of the gRPC users: channels closed on stop, calls timed and reported."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._channels: list[grpc.Channel] = []
        self.metadata: tuple[tuple[str, str], ...] = ()

    def channel(self, address: str) -> grpc.Channel:
        """A new channel to ``address``, closed when this user stops."""
        channel = open_channel(address)
        self._channels.append(channel)
        return channel

    def on_stop(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    def report(
        self,
        name: str,
        seconds: float,
        *,
        length: int = 0,
        exception: Exception | None = None,
        request_type: str = RPC_TYPE,
    ) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )

    def call(
        self,
        name: str,
        method: Callable[..., Any],
        request: Any,
        *,
        timeout: float,
        length: Callable[[Any], int] = lambda _: 0,
        cached: Callable[[Any], bool] = lambda _: False,
    ) -> Any | None:
        """One unary call, reported as ``name`` (or ``name (cached)``); ``None`` when it failed."""
        started = time.perf_counter()
        try:
            response = method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            self.report(name, time.perf_counter() - started, exception=RpcFailure(exc))
            return None
        elapsed = time.perf_counter() - started
        self.report(name + (CACHED_SUFFIX if cached(response) else ""), elapsed, length=length(response))
        return response

    def stream(
        self, name: str, method: Callable[..., Any], request: Any, *, timeout: float
    ) -> StreamTimer | None:
        """One ``GenerateStream``-shaped call: ``TTFT``/``ITL`` reported as tokens arrive, then the
        whole stream as ``name``; ``None`` when it failed or ended without its ``end`` message."""
        started = time.perf_counter()
        timer = StreamTimer(started)
        responses = method(request, timeout=timeout, metadata=self.metadata)
        try:
            for message in responses:
                timing = timer.observe(message, time.perf_counter())
                if timing is not None:
                    suffix = CACHED_SUFFIX if timer.cached else ""
                    self.report(
                        timing.kind + suffix, timing.seconds, length=timing.tokens, request_type=TOKEN_TYPE
                    )
        except grpc.RpcError as exc:
            self.report(name, time.perf_counter() - started, exception=RpcFailure(exc))
            return None
        finally:
            responses.cancel()  # a no-op once finished; frees the call when the user is stopped mid-stream
        elapsed = time.perf_counter() - started
        if not timer.ended:
            self.report(name, elapsed, exception=IncompleteStream("stream closed without its end message"))
            return None
        self.report(name + (CACHED_SUFFIX if timer.cached else ""), elapsed, length=timer.tokens)
        return timer
