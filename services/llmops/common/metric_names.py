"""Every Prometheus metric name the platform exports: the one source of truth.

The services' metrics module builds its collectors from these constants, and the chart's checks
(``tests/charts``) hold every Grafana dashboard and Prometheus rule against :data:`ALL_METRICS`,
:data:`ENGINE_PASSTHROUGH` and the recording rules, so a renamed metric fails a test instead of
silently emptying a panel. This module imports nothing beyond the standard library.

Naming follows the Prometheus guide: ``llmops_<subsystem>_<name>_<unit>``, base units, counters end
in ``_total`` (the name here is the exposed one, with ``_total``), histograms have explicit buckets,
and labels are bounded. Label values the rules and dashboards rely on:

- ``code``: the gRPC status name, upper case, as ``grpc.StatusCode.X.name`` (``OK``, ``INTERNAL``).
- ``service``: the full gRPC service name (``llmops.registry.v1.RegistryService``); ``method``: the
  RPC name (``Generate``).
- ``model``: the served model reference (``name@alias`` or ``name:version``) — the same string the
  serving service passes to vLLM as ``served_model_name``, so vLLM's ``model_name`` label lines up.
- ``finish_reason``: ``stop`` | ``length`` | ``abort`` | ``error``.
- ``result`` (cache): ``hit`` | ``miss`` | ``error`` | ``bypass`` (bypass: not cacheable, e.g. sampled).
- ``state`` (jobs gauges): ``pending`` | ``running`` | ``succeeded`` | ``failed`` | ``cancelled``;
  ``result`` (jobs counters): ``succeeded`` | ``failed`` | ``cancelled``.
- ``method``: training ``sft`` | ``lora`` | ``qlora`` | ``dpo``; quantization ``int8`` | ``int4`` |
  ``gptq`` | ``awq`` | ``gguf``.
- ``direction``: ``upload`` | ``download``; ``format``: ``safetensors`` | ``adapter`` | ``gguf``.

Colons appear only in recording rules (``llmops:...``) and in vLLM's own names, which pass through
unchanged because dashboards everywhere already know them.
"""

from __future__ import annotations

from typing import Final

COUNTER: Final = "counter"
GAUGE: Final = "gauge"
HISTOGRAM: Final = "histogram"

# --- platform (every gRPC server) -----------------------------------------------------------------
GRPC_SERVER_HANDLED_TOTAL: Final = "llmops_grpc_server_handled_total"
GRPC_SERVER_HANDLING_SECONDS: Final = "llmops_grpc_server_handling_seconds"
GRPC_SERVER_IN_FLIGHT: Final = "llmops_grpc_server_in_flight"
BUILD_INFO: Final = "llmops_build_info"

# --- serving (engine-independent) -----------------------------------------------------------------
SERVING_REQUESTS_WAITING: Final = "llmops_serving_requests_waiting"
SERVING_REQUESTS_RUNNING: Final = "llmops_serving_requests_running"
SERVING_TIME_TO_FIRST_TOKEN_SECONDS: Final = "llmops_serving_time_to_first_token_seconds"
SERVING_INTER_TOKEN_LATENCY_SECONDS: Final = "llmops_serving_inter_token_latency_seconds"
SERVING_REQUEST_DURATION_SECONDS: Final = "llmops_serving_request_duration_seconds"
SERVING_GENERATED_TOKENS_TOTAL: Final = "llmops_serving_generated_tokens_total"
SERVING_PROMPT_TOKENS_TOTAL: Final = "llmops_serving_prompt_tokens_total"
SERVING_REQUESTS_TOTAL: Final = "llmops_serving_requests_total"
SERVING_MODEL_LOADED: Final = "llmops_serving_model_loaded"
#: One observation per phase per model load (``phase``: see :data:`COLD_START_PHASES`).
SERVING_COLD_START_SECONDS: Final = "llmops_serving_cold_start_seconds"
#: Cold-start phases, in order: artifact download (resolve), weight load, engine start (compile,
#: KV cache, warm-up), and the first request's time to its first token on the fresh engine.
COLD_START_PHASES: Final[tuple[str, ...]] = ("resolve", "weights", "engine_start", "first_token")
#: One observation per phase of a pool replica's rolling reload (``phase``: see :data:`RELOAD_PHASES`).
SERVING_RELOAD_PHASE_SECONDS: Final = "llmops_serving_reload_phase_seconds"
#: Rolling reloads of a pool replica by ``outcome``: ``succeeded`` | ``failed``.
SERVING_RELOADS_TOTAL: Final = "llmops_serving_reloads_total"
#: The version a pool replica serves now (0: none), labelled ``model`` and ``pool``.
SERVING_POOL_VERSION: Final = "llmops_serving_pool_version"
#: Phases of a rolling reload, in order: waiting for the pool's lease, draining (out of the rotation,
#: in-flight requests finish), unloading the old version, loading the new one, settling (SERVING,
#: holding the lease until readiness probes and routers see it back).
RELOAD_PHASES: Final[tuple[str, ...]] = ("waiting", "draining", "unloading", "loading", "settling")

# --- cache ----------------------------------------------------------------------------------------
CACHE_REQUESTS_TOTAL: Final = "llmops_cache_requests_total"
CACHE_LOOKUP_SECONDS: Final = "llmops_cache_lookup_seconds"
CACHE_ENTRIES: Final = "llmops_cache_entries"
CACHE_BYTES: Final = "llmops_cache_bytes"
CACHE_INVALIDATIONS_TOTAL: Final = "llmops_cache_invalidations_total"

# --- router -------------------------------------------------------------------------------------
#: Requests waiting for a ready replica of a model (request holding): KEDA scales serving from 0 on it.
ROUTER_PENDING_REQUESTS: Final = "llmops_router_pending_requests"
#: Routing decisions by ``policy`` and ``outcome`` (``chosen`` | ``prefix_hit`` | ``prefix_miss`` |
#: ``spill``: a prefix holder was saturated, the request went to the least loaded).
ROUTER_DECISIONS_TOTAL: Final = "llmops_router_decisions_total"
ROUTER_DECISION_SECONDS: Final = "llmops_router_decision_seconds"
#: Requests by the ``model`` asked for, the ``version`` that answered (``name:N``, empty when none
#: did) and the gRPC ``code``.
ROUTER_REQUESTS_TOTAL: Final = "llmops_router_requests_total"
ROUTER_RETRIES_TOTAL: Final = "llmops_router_retries_total"
ROUTER_HOLD_SECONDS: Final = "llmops_router_hold_seconds"
#: Each replica's load as last reported (queued plus running), by ``endpoint`` (host:port) and ``model``.
ROUTER_ENDPOINT_LOAD: Final = "llmops_router_endpoint_load"
ROUTER_ENDPOINT_IN_FLIGHT: Final = "llmops_router_endpoint_in_flight"
ROUTER_ENDPOINTS: Final = "llmops_router_endpoints"
#: Time to first token of streams through the router, by registry ``model`` name and ``version``
#: (the number): what a rollout judges a challenger on, beside its champion.
ROUTER_TTFT_SECONDS: Final = "llmops_router_ttft_seconds"
#: Time between consecutive streamed tokens through the router, by ``model`` and ``version``.
ROUTER_INTER_TOKEN_SECONDS: Final = "llmops_router_inter_token_seconds"

# --- jobs -----------------------------------------------------------------------------------------
TRAINING_JOBS: Final = "llmops_training_jobs"
TRAINING_JOBS_FINISHED_TOTAL: Final = "llmops_training_jobs_finished_total"
#: Loss at the latest logged step of any running job of a method (per-job curves live in MLflow;
#: a job id label would be unbounded).
TRAINING_LAST_LOSS: Final = "llmops_training_last_loss"
#: Summed training throughput of the running jobs of a method.
TRAINING_TOKENS_PER_SECOND: Final = "llmops_training_tokens_per_second"
QUANTIZATION_JOBS: Final = "llmops_quantization_jobs"
QUANTIZATION_JOBS_FINISHED_TOTAL: Final = "llmops_quantization_jobs_finished_total"

# --- registry -------------------------------------------------------------------------------------
REGISTRY_VERSIONS_REGISTERED_TOTAL: Final = "llmops_registry_versions_registered_total"
REGISTRY_ARTIFACT_BYTES_TOTAL: Final = "llmops_registry_artifact_bytes_total"
REGISTRY_VERIFICATION_FAILURES_TOTAL: Final = "llmops_registry_verification_failures_total"

#: Every metric the llmops services export: exposed name -> type.
ALL_METRICS: Final[dict[str, str]] = {
    GRPC_SERVER_HANDLED_TOTAL: COUNTER,
    GRPC_SERVER_HANDLING_SECONDS: HISTOGRAM,
    GRPC_SERVER_IN_FLIGHT: GAUGE,
    BUILD_INFO: GAUGE,
    SERVING_REQUESTS_WAITING: GAUGE,
    SERVING_REQUESTS_RUNNING: GAUGE,
    SERVING_TIME_TO_FIRST_TOKEN_SECONDS: HISTOGRAM,
    SERVING_INTER_TOKEN_LATENCY_SECONDS: HISTOGRAM,
    SERVING_REQUEST_DURATION_SECONDS: HISTOGRAM,
    SERVING_GENERATED_TOKENS_TOTAL: COUNTER,
    SERVING_PROMPT_TOKENS_TOTAL: COUNTER,
    SERVING_REQUESTS_TOTAL: COUNTER,
    SERVING_MODEL_LOADED: GAUGE,
    SERVING_COLD_START_SECONDS: HISTOGRAM,
    SERVING_RELOAD_PHASE_SECONDS: HISTOGRAM,
    SERVING_RELOADS_TOTAL: COUNTER,
    SERVING_POOL_VERSION: GAUGE,
    CACHE_REQUESTS_TOTAL: COUNTER,
    CACHE_LOOKUP_SECONDS: HISTOGRAM,
    CACHE_ENTRIES: GAUGE,
    CACHE_BYTES: GAUGE,
    CACHE_INVALIDATIONS_TOTAL: COUNTER,
    ROUTER_PENDING_REQUESTS: GAUGE,
    ROUTER_DECISIONS_TOTAL: COUNTER,
    ROUTER_DECISION_SECONDS: HISTOGRAM,
    ROUTER_REQUESTS_TOTAL: COUNTER,
    ROUTER_RETRIES_TOTAL: COUNTER,
    ROUTER_HOLD_SECONDS: HISTOGRAM,
    ROUTER_ENDPOINT_LOAD: GAUGE,
    ROUTER_ENDPOINT_IN_FLIGHT: GAUGE,
    ROUTER_ENDPOINTS: GAUGE,
    ROUTER_TTFT_SECONDS: HISTOGRAM,
    ROUTER_INTER_TOKEN_SECONDS: HISTOGRAM,
    TRAINING_JOBS: GAUGE,
    TRAINING_JOBS_FINISHED_TOTAL: COUNTER,
    TRAINING_LAST_LOSS: GAUGE,
    TRAINING_TOKENS_PER_SECOND: GAUGE,
    QUANTIZATION_JOBS: GAUGE,
    QUANTIZATION_JOBS_FINISHED_TOTAL: COUNTER,
    REGISTRY_VERSIONS_REGISTERED_TOTAL: COUNTER,
    REGISTRY_ARTIFACT_BYTES_TOTAL: COUNTER,
    REGISTRY_VERIFICATION_FAILURES_TOTAL: COUNTER,
}

#: Label names of each metric in :data:`ALL_METRICS` (histograms add ``le`` on their buckets).
METRIC_LABELS: Final[dict[str, tuple[str, ...]]] = {
    GRPC_SERVER_HANDLED_TOTAL: ("service", "method", "code"),
    GRPC_SERVER_HANDLING_SECONDS: ("service", "method"),
    GRPC_SERVER_IN_FLIGHT: ("service", "method"),
    BUILD_INFO: ("version",),
    SERVING_REQUESTS_WAITING: ("model",),
    SERVING_REQUESTS_RUNNING: ("model",),
    SERVING_TIME_TO_FIRST_TOKEN_SECONDS: ("model",),
    SERVING_INTER_TOKEN_LATENCY_SECONDS: ("model",),
    SERVING_REQUEST_DURATION_SECONDS: ("model",),
    SERVING_GENERATED_TOKENS_TOTAL: ("model",),
    SERVING_PROMPT_TOKENS_TOTAL: ("model",),
    SERVING_REQUESTS_TOTAL: ("model", "finish_reason"),
    SERVING_MODEL_LOADED: ("model", "engine"),
    SERVING_COLD_START_SECONDS: ("model", "phase"),
    SERVING_RELOAD_PHASE_SECONDS: ("model", "pool", "phase"),
    SERVING_RELOADS_TOTAL: ("model", "pool", "outcome"),
    SERVING_POOL_VERSION: ("model", "pool"),
    CACHE_REQUESTS_TOTAL: ("result",),
    CACHE_LOOKUP_SECONDS: (),
    CACHE_ENTRIES: (),
    CACHE_BYTES: (),
    CACHE_INVALIDATIONS_TOTAL: (),
    ROUTER_PENDING_REQUESTS: ("model",),
    ROUTER_DECISIONS_TOTAL: ("policy", "outcome"),
    ROUTER_DECISION_SECONDS: (),
    ROUTER_REQUESTS_TOTAL: ("model", "version", "code"),
    ROUTER_RETRIES_TOTAL: ("model",),
    ROUTER_HOLD_SECONDS: ("model",),
    ROUTER_ENDPOINT_LOAD: ("endpoint", "model"),
    ROUTER_ENDPOINT_IN_FLIGHT: ("endpoint",),
    ROUTER_ENDPOINTS: ("state",),
    ROUTER_TTFT_SECONDS: ("model", "version"),
    ROUTER_INTER_TOKEN_SECONDS: ("model", "version"),
    TRAINING_JOBS: ("state",),
    TRAINING_JOBS_FINISHED_TOTAL: ("method", "result"),
    TRAINING_LAST_LOSS: ("method",),
    TRAINING_TOKENS_PER_SECOND: ("method",),
    QUANTIZATION_JOBS: ("state",),
    QUANTIZATION_JOBS_FINISHED_TOTAL: ("method", "result"),
    REGISTRY_VERSIONS_REGISTERED_TOTAL: ("format",),
    REGISTRY_ARTIFACT_BYTES_TOTAL: ("direction",),
    REGISTRY_VERIFICATION_FAILURES_TOTAL: (),
}

# --- histogram buckets (seconds) ------------------------------------------------------------------
#: Unary calls take milliseconds; streaming generation and artifact transfers take minutes.
GRPC_HANDLING_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
#: vLLM's time-to-first-token buckets, cut at 80 s, so both sources read alike on one panel.
TTFT_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
#: vLLM's inter-token buckets with finer steps below 10 ms, where a GPU decodes.
INTER_TOKEN_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
REQUEST_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
#: A Redis GET on the same network answers in well under a millisecond.
CACHE_LOOKUP_BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

#: A cold-start phase takes from milliseconds (a cached artifact) to minutes (a large model's weights).
COLD_START_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

#: A routing decision is pure Python over a handful of replicas: tens of microseconds.
ROUTER_DECISION_BUCKETS: Final[tuple[float, ...]] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
)  # fmt: skip

#: Buckets of every histogram in :data:`ALL_METRICS`.
HISTOGRAM_BUCKETS: Final[dict[str, tuple[float, ...]]] = {
    GRPC_SERVER_HANDLING_SECONDS: GRPC_HANDLING_BUCKETS,
    SERVING_TIME_TO_FIRST_TOKEN_SECONDS: TTFT_BUCKETS,
    SERVING_INTER_TOKEN_LATENCY_SECONDS: INTER_TOKEN_LATENCY_BUCKETS,
    SERVING_REQUEST_DURATION_SECONDS: REQUEST_DURATION_BUCKETS,
    SERVING_COLD_START_SECONDS: COLD_START_BUCKETS,
    SERVING_RELOAD_PHASE_SECONDS: COLD_START_BUCKETS,
    CACHE_LOOKUP_SECONDS: CACHE_LOOKUP_BUCKETS,
    ROUTER_DECISION_SECONDS: ROUTER_DECISION_BUCKETS,
    ROUTER_HOLD_SECONDS: REQUEST_DURATION_BUCKETS,
    ROUTER_TTFT_SECONDS: TTFT_BUCKETS,
    ROUTER_INTER_TOKEN_SECONDS: INTER_TOKEN_LATENCY_BUCKETS,
}

# --- vLLM pass-through ----------------------------------------------------------------------------
# vLLM (V1 engine, 0.11 and later) registers these in the process-wide prometheus_client registry, so
# they appear on the serving pod's /metrics unchanged, labelled ``model_name`` and ``engine``.
# Counters are declared without ``_total`` in vLLM's code; the exposed names below carry it.
VLLM_NUM_REQUESTS_WAITING: Final = "vllm:num_requests_waiting"
VLLM_NUM_REQUESTS_RUNNING: Final = "vllm:num_requests_running"
VLLM_TIME_TO_FIRST_TOKEN_SECONDS: Final = "vllm:time_to_first_token_seconds"
#: Replaced ``vllm:time_per_output_token_seconds`` (deprecated in 0.11).
VLLM_INTER_TOKEN_LATENCY_SECONDS: Final = "vllm:inter_token_latency_seconds"
VLLM_E2E_REQUEST_LATENCY_SECONDS: Final = "vllm:e2e_request_latency_seconds"
VLLM_REQUEST_QUEUE_TIME_SECONDS: Final = "vllm:request_queue_time_seconds"
VLLM_GENERATION_TOKENS_TOTAL: Final = "vllm:generation_tokens_total"
VLLM_PROMPT_TOKENS_TOTAL: Final = "vllm:prompt_tokens_total"
#: Replaced ``vllm:gpu_cache_usage_perc``; a fraction in [0, 1] despite the name.
VLLM_KV_CACHE_USAGE_PERC: Final = "vllm:kv_cache_usage_perc"

#: Engine metric names the platform relies on: exposed name -> type.
ENGINE_PASSTHROUGH: Final[dict[str, str]] = {
    VLLM_NUM_REQUESTS_WAITING: GAUGE,
    VLLM_NUM_REQUESTS_RUNNING: GAUGE,
    VLLM_TIME_TO_FIRST_TOKEN_SECONDS: HISTOGRAM,
    VLLM_INTER_TOKEN_LATENCY_SECONDS: HISTOGRAM,
    VLLM_E2E_REQUEST_LATENCY_SECONDS: HISTOGRAM,
    VLLM_REQUEST_QUEUE_TIME_SECONDS: HISTOGRAM,
    VLLM_GENERATION_TOKENS_TOTAL: COUNTER,
    VLLM_PROMPT_TOKENS_TOTAL: COUNTER,
    VLLM_KV_CACHE_USAGE_PERC: GAUGE,
}

#: Series names a histogram ``name`` exposes.
HISTOGRAM_SUFFIXES: Final[tuple[str, ...]] = ("_bucket", "_sum", "_count")


def exposed_series(metrics: dict[str, str]) -> frozenset[str]:
    """Every series name that ``metrics`` (name -> type) put on a /metrics page.

    A histogram ``h`` exposes ``h_bucket``, ``h_sum`` and ``h_count``; counters and gauges expose
    their own name.
    """
    names: set[str] = set()
    for name, kind in metrics.items():
        if kind == HISTOGRAM:
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(name)
    return frozenset(names)
