"""Serving metrics: our own ``llmops_serving_*`` and the engine metrics under vLLM's names.

Dashboards and the autoscaler read ``vllm:num_requests_waiting`` and friends whatever the engine.
vLLM registers those itself in prometheus_client's process-wide registry; :class:`EngineMetricsBridge`
passes them through to the service's own registry unchanged and, for models in engines that export
nothing (transformers, TensorRT-LLM, the fake), adds the same families measured by the service,
labelled like vLLM's (``model_name``, ``engine``). Both sources merge into one family per name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from llmops.common import metric_names as names
from llmops.serving.engines.base import EngineStats

ENGINE_LABELS = ("model_name", "engine")


class ServingMetrics:
    """``llmops_serving_*`` collectors, labelled by served model name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=names.HISTOGRAM_BUCKETS[name], registry=registry)

        self.waiting = Gauge(
            names.SERVING_REQUESTS_WAITING,
            "Requests queued for a model's engine.",
            ["model"],
            registry=registry,
        )
        self.running = Gauge(
            names.SERVING_REQUESTS_RUNNING,
            "Requests a model's engine works on now.",
            ["model"],
            registry=registry,
        )
        self.ttft = histogram(
            names.SERVING_TIME_TO_FIRST_TOKEN_SECONDS, "Time from arrival to the first token."
        )
        self.itl = histogram(
            names.SERVING_INTER_TOKEN_LATENCY_SECONDS, "Time between a request's output tokens."
        )
        self.duration = histogram(
            names.SERVING_REQUEST_DURATION_SECONDS, "Time from arrival to the last token."
        )
        self.generated_tokens = Counter(
            names.SERVING_GENERATED_TOKENS_TOTAL.removesuffix("_total"),
            "Tokens generated.",
            ["model"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            names.SERVING_PROMPT_TOKENS_TOTAL.removesuffix("_total"),
            "Prompt tokens processed.",
            ["model"],
            registry=registry,
        )
        self.requests = Counter(
            names.SERVING_REQUESTS_TOTAL.removesuffix("_total"),
            "Requests finished, by finish reason (error: failed after admission).",
            ["model", "finish_reason"],
            registry=registry,
        )
        self.model_loaded = Gauge(
            names.SERVING_MODEL_LOADED,
            "1 while a model is loaded and ready.",
            ["model", "engine"],
            registry=registry,
        )
        self.cold_start = Histogram(
            names.SERVING_COLD_START_SECONDS,
            "Seconds of each cold-start phase of a model load (resolve, weights, engine_start, first_token).",
            ["model", "phase"],
            buckets=names.HISTOGRAM_BUCKETS[names.SERVING_COLD_START_SECONDS],
            registry=registry,
        )


class EngineShimMetrics:
    """The ``vllm:*`` families for engines that do not export them, measured by the service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ENGINE_LABELS, buckets=buckets, registry=r)

        self.waiting = Gauge(names.VLLM_NUM_REQUESTS_WAITING, "Requests waiting.", ENGINE_LABELS, registry=r)
        self.running = Gauge(names.VLLM_NUM_REQUESTS_RUNNING, "Requests running.", ENGINE_LABELS, registry=r)
        self.kv_cache_usage = Gauge(
            names.VLLM_KV_CACHE_USAGE_PERC, "KV cache usage (1 means 100 percent).", ENGINE_LABELS, registry=r
        )
        self.ttft = histogram(
            names.VLLM_TIME_TO_FIRST_TOKEN_SECONDS, "Time to first token.", names.TTFT_BUCKETS
        )
        self.itl = histogram(
            names.VLLM_INTER_TOKEN_LATENCY_SECONDS, "Inter-token latency.", names.INTER_TOKEN_LATENCY_BUCKETS
        )
        self.e2e = histogram(
            names.VLLM_E2E_REQUEST_LATENCY_SECONDS,
            "End-to-end request latency.",
            names.REQUEST_DURATION_BUCKETS,
        )
        self.queue_time = histogram(
            names.VLLM_REQUEST_QUEUE_TIME_SECONDS, "Time spent waiting.", names.REQUEST_DURATION_BUCKETS
        )
        self.prompt_tokens = Counter(
            names.VLLM_PROMPT_TOKENS_TOTAL.removesuffix("_total"), "Prompt tokens.", ENGINE_LABELS, registry=r
        )
        self.generation_tokens = Counter(
            names.VLLM_GENERATION_TOKENS_TOTAL.removesuffix("_total"),
            "Generated tokens.",
            ENGINE_LABELS,
            registry=r,
        )

    def labels(self, served_name: str) -> tuple[str, str]:
        return (served_name, "0")

    def forget(self, served_name: str) -> None:
        """Drop a model's series (it was unloaded)."""
        for metric in (
            self.waiting, self.running, self.kv_cache_usage, self.ttft, self.itl, self.e2e, self.queue_time,
            self.prompt_tokens, self.generation_tokens,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                metric.remove(*self.labels(served_name))


class EngineMetricsBridge(Collector):
    """Collects the ``vllm:*`` families: vLLM's own (process-wide registry) merged with the shim's.

    Args:
        shim: the service-measured families.
        refresh: called before each scrape to update the shim's gauges from engine stats.
        source: where vLLM registers (prometheus_client's default registry).
    """

    def __init__(
        self,
        shim: EngineShimMetrics,
        refresh: Callable[[], None] = lambda: None,
        source: CollectorRegistry = REGISTRY,
    ) -> None:
        self._shim = shim
        self._refresh = refresh
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return []  # families come and go with the engines loaded

    def collect(self) -> Iterable[Metric]:
        self._refresh()
        merged: dict[str, Metric] = {}
        vllm_families = [m for m in self._source.collect() if m.name.startswith("vllm:")]
        for family in [*vllm_families, *self._shim.registry.collect()]:
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged[family.name].samples.extend(family.samples)
        return [family for family in merged.values() if family.samples]


def update_shim_gauges(
    shim: EngineShimMetrics, served_name: str, waiting: int, stats: EngineStats | None
) -> None:
    """Set a model's waiting/running/KV gauges from the service's queue and the engine's stats."""
    labels = shim.labels(served_name)
    shim.waiting.labels(*labels).set(waiting)
    shim.running.labels(*labels).set(stats.running if stats else 0)
    shim.kv_cache_usage.labels(*labels).set(stats.kv_cache_usage if stats else 0.0)
