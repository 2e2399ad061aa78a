"""Prometheus metrics of the shared gRPC runtime, and the /metrics HTTP endpoint.

Every holder takes a ``registry=`` so tests can use a fresh ``CollectorRegistry``. Labels are
bounded: service, method, code — never request or user ids.

The endpoint always answers in the Prometheus text format 0.0.4, whatever the scraper's Accept
header asks for: prometheus_client's OpenMetrics encoder (which Prometheus asks for first) rewrites
``vllm:kv_cache_usage_perc`` to ``vllm_kv_cache_usage_perc`` in the samples, so the series the
rules and dashboards read under vLLM's names would never reach Prometheus.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from llmops import __version__
from llmops.common import metric_names as names


class GrpcServerMetrics:
    """``llmops_grpc_server_*``: calls handled by code, handling time, calls in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            names.GRPC_SERVER_HANDLED_TOTAL,
            "gRPC calls completed, by final status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            names.GRPC_SERVER_HANDLING_SECONDS,
            "Time from receiving a call to sending its status.",
            ["service", "method"],
            buckets=names.GRPC_HANDLING_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            names.GRPC_SERVER_IN_FLIGHT,
            "gRPC calls being handled now.",
            ["service", "method"],
            registry=registry,
        )
        self.build_info = Gauge(
            names.BUILD_INFO, "Version of the running llmops build (value is 1).", ["version"],
            registry=registry,
        )  # fmt: skip
        self.build_info.labels(version=__version__).set(1)


@dataclass
class MetricsHttpServer:
    """A running /metrics endpoint."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def metrics_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """A WSGI app answering ``/metrics`` (and ``/``) with ``registry`` in the text format 0.0.4."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        body = generate_latest(registry)
        start_response(
            "200 OK", [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsHttpServer:
    """Start the Prometheus text endpoint on ``host:port`` (port 0 picks a free one)."""
    kind = _ThreadingServer6 if ":" in host else _ThreadingServer
    server = make_server(host, port, metrics_app(registry), kind, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsHttpServer(server, thread)
