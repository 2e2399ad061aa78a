"""The /metrics endpoint answers in the text format whatever the scraper asks for.

Invariant: a metric named with a colon (vLLM's ``vllm:*`` series, which the rules and dashboards
read) keeps its name in every sample, also when the request carries the Accept header Prometheus
sends (OpenMetrics first), and the answer is the text format 0.0.4.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge

from llmops.common.metrics import serve_metrics

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_colon_names_survive_prometheus_content_negotiation() -> None:
    registry = CollectorRegistry()
    Gauge("vllm:kv_cache_usage_perc", "KV cache use.", ["model_name"], registry=registry).labels("m").set(
        0.25
    )
    server = serve_metrics("127.0.0.1", 0, registry)
    try:
        for accept in (PROMETHEUS_ACCEPT, "", "text/plain"):
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}/metrics")
            if accept:
                request.add_header("Accept", accept)
            with urllib.request.urlopen(request, timeout=5) as response:
                body = response.read().decode()
                content_type = response.headers["Content-Type"]
            assert content_type.startswith("text/plain; version=0.0.4"), accept
            assert 'vllm:kv_cache_usage_perc{model_name="m"} 0.25' in body, accept
            assert "vllm_kv_cache_usage_perc" not in body, accept
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nope", timeout=5)
        assert info.value.code == 404
    finally:
        server.stop()
