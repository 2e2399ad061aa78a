"""Settings for every llmops process: one pydantic model, read once in ``main()``.

Values come from (lowest to highest priority) the defaults here, a YAML file (``from_file`` or the
``LLMOPS_CONFIG_FILE`` variable), and ``LLMOPS_*`` environment variables. A top-level field ``x`` is
``LLMOPS_X``; a field ``y`` of the section ``serving`` is ``LLMOPS_SERVING_Y`` (a field ``z`` of a model
``y`` inside it, ``LLMOPS_SERVING_Y__Z``; or the whole of ``y`` as JSON). Unknown keys in the
file and unknown ``LLMOPS_*`` variables are rejected as typos, and a bad value stops start-up with a
:class:`SettingsError` that names the variable or key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "LLMOPS_"
#: ``LLMOPS_`` variables that are read elsewhere, not settings fields.
NON_SETTINGS_ENV = frozenset({"LLMOPS_CONFIG_FILE", "LLMOPS_TINY_MODEL_CACHE"})

ServiceName = Literal["registry", "training", "quantization", "serving", "cache", "router"]
SERVICE_NAMES: tuple[ServiceName, ...] = (
    "registry",
    "training",
    "quantization",
    "serving",
    "cache",
    "router",
)


class SettingsError(ValueError):
    """A setting is missing, unknown or has a bad value; the message names it."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class ServiceEndpoint(_Model):
    """Where a service listens by default, and where its clients reach it."""

    port: int = Field(description="gRPC port this service binds when it is started (0 picks a free one).")
    metrics_port: int = Field(description="HTTP port of /metrics (0 picks a free one).")
    address: str = Field(description="host:port clients use to reach this service.")


class RegistrySection(ServiceEndpoint):
    """Registry service settings.

    MLflow's tracking URI and artifact root are the top-level ``mlflow_tracking_uri`` and
    ``mlflow_artifact_root``; unset, the registry uses ``sqlite:///<data_dir>/mlflow.db`` and
    ``<data_dir>/mlartifacts``. With a tracking server and no artifact root, files go where the
    server's default artifact root says. Several replicas must share ``alias_db_url`` (PostgreSQL).
    """

    experiment_name: str = Field(
        default="llmops-registry",
        min_length=1,
        description="MLflow experiment whose runs hold version files.",
    )
    alias_db_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL (SQLite or PostgreSQL) of the alias history and lock table; "
            "unset: sqlite:///<data_dir>/registry/aliases.db. Shared by every registry replica."
        ),
    )
    staging_dir: Path | None = Field(
        default=None,
        description=(
            "Folder for uploads in progress; unset: <data_dir>/registry/staging. On the artifact "
            "folder's disk, a finished upload moves into place without a copy."
        ),
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where files of a remote artifact store (S3) are cached to be streamed; unset: <data_dir>/registry/cache.",
    )
    max_artifact_bytes: int = Field(
        default=1 << 40, ge=1, description="Largest artifact one registration may upload, in bytes."
    )
    upload_chunk_bytes: int = Field(
        default=1024 * 1024,
        ge=4096,
        le=3 * 1024 * 1024,
        description="Chunk size clients (the CLI) use for uploads and ask for on downloads, in bytes.",
    )
    source_uri_schemes: list[str] = Field(
        default_factory=lambda: ["file", "s3", "gs", "runs", "models", "mlflow-artifacts"],
        description="URI schemes RegisterVersion accepts as source_uri (the server reads them).",
    )
    mlflow_telemetry: bool = Field(default=False, description="Leave MLflow's usage telemetry on.")
    artifacts_destination: str | None = Field(
        default=None,
        description=(
            "The MLflow server's --artifacts-destination (e.g. s3://bucket/mlartifacts), so versions stored "
            "under mlflow-artifacts:/ URIs can be located in the store and read directly by serving pods."
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint presigned URLs point at; unset: MLFLOW_S3_ENDPOINT_URL, else AWS.",
    )
    presign_seconds: int = Field(
        default=3600,
        ge=60,
        le=604800,
        description="How long presigned artifact URLs stay valid when the caller asks for no other expiry.",
    )


class JobServiceSection(ServiceEndpoint):
    """What the job services (training, quantization) share: where job bodies run and how they stop."""

    runner: Literal["ray", "thread"] = Field(
        default="ray",
        description="Where job bodies run: Ray actors (local runtime or ray_address), or threads of the service (development).",
    )
    default_cpus: float = Field(
        default=2.0,
        gt=0,
        description="CPUs per Ray worker when a job names none (Ray also sets its torch threads).",
    )
    cancel_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How long a cancelled job may take to stop before its worker is killed.",
    )
    poll_seconds: float = Field(
        default=0.5, gt=0, le=60, description="Longest wait for a worker's events in one poll."
    )
    tracking: bool = Field(default=True, description="Log every job to an MLflow run (mlflow_tracking_uri).")


class TrainingSection(JobServiceSection):
    """Training service settings; the Ray cluster is the top-level ``ray_address``."""

    use_registry: bool = Field(
        default=True,
        description=(
            "Read base models from and register results in the registry service at registry.address "
            "(bases are cached under <data_dir>/training/bases); false: numbered folders under models_dir."
        ),
    )
    models_dir: Path | None = Field(
        default=None,
        description="Local model versions (<name>/<version>/) when use_registry is off; unset: <data_dir>/training/models.",
    )
    data_repo: Path = Field(
        default=Path("."),
        description="Root of the DVC data repository that dataset paths are relative to (a Git work tree).",
    )
    work_dir: Path | None = Field(
        default=None,
        description="Job folders (snapshot, checkpoints, output); unset: <data_dir>/training/jobs. Shared with workers on a cluster.",
    )
    max_concurrent_jobs: int = Field(
        default=1, ge=1, le=256, description="Jobs on workers at once; the rest wait."
    )
    warm_worker: bool = Field(
        default=False,
        description=(
            "Ray runner: keep one spare worker process up with the training libraries imported, so a "
            "CPU job starts in it without waiting seconds for a new process (it holds no CPUs while "
            "idle; the job's CPUs are reserved when it takes one). Costs one idle process's memory."
        ),
    )
    max_queued_jobs: int = Field(
        default=32, ge=1, description="Waiting jobs beyond which SubmitJob answers RESOURCE_EXHAUSTED."
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Tries per job; a lost worker resumes from its last checkpoint until then.",
    )
    max_dataset_bytes: int = Field(
        default=1 << 30, ge=1, description="Largest dataset file a job may train on."
    )
    mlflow_experiment: str = Field(
        default="llmops-training", min_length=1, description="MLflow experiment of jobs that name none."
    )
    checkpoint_storage: str = Field(
        default="",
        description=(
            "Ray Train storage for data-parallel jobs' checkpoints (num_workers > 1): a folder every "
            "Ray node mounts, or an S3-compatible URI (s3://bucket/prefix); unset: <data_dir>/training/ray-storage."
        ),
    )
    max_worker_failures: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Data-parallel jobs: times Ray Train restarts the worker group from the last checkpoint after a lost worker.",
    )


class QuantizationSection(JobServiceSection):
    """Quantization service settings."""

    models_dir: Path | None = Field(
        default=None,
        description=(
            "Folder of local model versions (<name>/<version>/) that jobs read sources from and "
            "register results into when use_registry is off; unset: <data_dir>/quantization/models."
        ),
    )
    use_registry: bool = Field(
        default=False,
        description=(
            "Read sources from and register results in the registry service at registry.address "
            "(sources are cached under <data_dir>/quantization/sources) instead of models_dir."
        ),
    )
    work_dir: Path | None = Field(
        default=None, description="Scratch folder for job outputs; unset: <data_dir>/quantization/work."
    )
    workers: int = Field(default=1, ge=1, le=16, description="Jobs that run at once on this server.")
    max_pending: int = Field(
        default=8, ge=1, description="Queued plus running jobs before SubmitJob answers RESOURCE_EXHAUSTED."
    )
    mlflow_experiment: str = Field(
        default="llmops-quantization", min_length=1, description="MLflow experiment the jobs' runs go in."
    )


class ServingFaults(_Model):
    """Fault injection: a testing feature, off by default (every field 0).

    Makes a serving replica worse on purpose, to test what watches it (rollout SLO gates, the
    router's error accounting, alerts): every generation waits ``ttft_delay_ms`` before its first
    token and ``inter_token_delay_ms`` before each later one, and a share ``error_ratio`` of
    generations (drawn from a random generator seeded with ``seed``) fail before their first token
    with INTERNAL (``injected fault``): a server error the router counts, does not retry on another
    replica and does not take for a dead replica. Environment:
    ``LLMOPS_SERVING_FAULTS__TTFT_DELAY_MS=200`` (or ``LLMOPS_SERVING_FAULTS='{"error_ratio": 0.2}'``).
    A replica with faults on logs a warning at start and ``llmops serve serving --check`` says so.
    """

    ttft_delay_ms: float = Field(
        default=0.0, ge=0, le=600_000, description="Added before the first token (ms)."
    )
    inter_token_delay_ms: float = Field(
        default=0.0, ge=0, le=60_000, description="Added before each token after the first (ms)."
    )
    error_ratio: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of generations failed with INTERNAL before their first token.",
    )
    seed: int = Field(default=0, description="Seed of the generator that draws the failing generations.")

    @property
    def enabled(self) -> bool:
        """True when any fault is set."""
        return bool(self.ttft_delay_ms or self.inter_token_delay_ms or self.error_ratio)

    def describe(self) -> str:
        """The faults in effect, for logs and ``--check``."""
        return (
            f"ttft +{self.ttft_delay_ms:g} ms, inter-token +{self.inter_token_delay_ms:g} ms, "
            f"errors {self.error_ratio:.0%} (seed {self.seed})"
        )


class WeightsSection(_Model):
    """How a serving replica gets a registry version's files (see llmops.common.artifacts.direct)."""

    source: Literal["store", "registry"] = Field(
        default="store",
        description=(
            "store: read the files straight from the artifact store (a shared volume or presigned S3 URLs "
            "from the registry's GetArtifactLocations), never through the registry process. registry: stream "
            "them through the registry's DownloadArtifact (the laptop/legacy path; one process carries every "
            "replica's bytes)."
        ),
    )
    shared_mount: Path | None = Field(
        default=None,
        description=(
            "This replica's mount of the registry's filesystem artifact store: replaces the registry's "
            "artifact root in the paths it returns. Unset: the paths as the registry sees them (same machine)."
        ),
    )
    download_concurrency: int = Field(
        default=4, ge=1, le=64, description="Files downloaded at once from presigned URLs."
    )
    read_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A read from the store that sends nothing for this long fails the load with UNAVAILABLE.",
    )
    url_ttl_seconds: int = Field(
        default=0,
        ge=0,
        le=604800,
        description="Validity asked of presigned URLs; 0: the registry's default.",
    )
    cache_max_bytes: int = Field(
        default=0,
        ge=0,
        description=(
            "Byte budget of the node cache (model_cache_dir): after a fill, least recently used entries "
            "that no process on the node is serving are removed until it fits; 0: never evict."
        ),
    )


class ServingSection(ServiceEndpoint):
    """Serving service settings."""

    http_port: int = Field(
        default=8000, ge=0, description="Port of the OpenAI-compatible HTTP API (0 picks a free one)."
    )
    http_enabled: bool = Field(default=True, description="Serve the OpenAI-compatible HTTP API.")
    model: str | None = Field(
        default=None,
        description="Model to load at start: name@alias, name:version or name (registry), or a folder path.",
    )
    served_name: str | None = Field(
        default=None, description="Name requests use for the start-up model; unset: the model or folder name."
    )
    pool: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        description=(
            "Serving pool this replica belongs to (e.g. champion, challenger): the registry's pool record for "
            "(model, pool) decides the version it serves and rolls the pool's replicas one at a time when it "
            "changes. Unset: the replica serves its model on its own (follow_alias reloads)."
        ),
    )
    pool_poll_seconds: float = Field(
        default=2.0, gt=0, le=300, description="How often a pool replica syncs with its pool's record."
    )
    pool_lease_seconds: int = Field(
        default=120,
        ge=5,
        le=3600,
        description="Lifetime of a pool's reload lease, renewed every third of it while a replica reloads.",
    )
    pool_settle_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description=(
            "A reloading replica waits this long after turning NOT_SERVING before draining, and holds the lease "
            "this long after turning SERVING again, so readiness probes and routers see each change before "
            "the next replica leaves (at least health_poll_seconds)."
        ),
    )
    engine: Literal["vllm", "transformers", "tensorrt_llm"] = Field(
        default="vllm", description="Engine used for models loaded without an explicit engine."
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Engine options of the start-up model, by EngineOptions field name "
            '(e.g. {"kv_cache_bytes": 1073741824, "max_model_len": 2048}).'
        ),
    )
    max_waiting: int = Field(
        default=256,
        ge=1,
        description="Queued requests per model beyond which new ones get RESOURCE_EXHAUSTED.",
    )
    max_tokens_limit: int = Field(
        default=0,
        ge=0,
        description="Cap on max_tokens per completion; 0 means only the context length bounds it.",
    )
    drain_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long an unload lets in-flight requests finish before aborting them.",
    )
    alias_poll_seconds: float = Field(
        default=30.0, gt=0, description="How often a model loaded with follow_alias checks its alias."
    )
    weights: WeightsSection = Field(
        default_factory=WeightsSection,
        description="Where registry versions' files are read from; the node cache is model_cache_dir.",
    )
    replace_unloads_first: bool = Field(
        default=False,
        description=(
            "A replacing load (a new version, a followed alias that moved) unloads the old model before "
            "loading the new one, for models that do not fit twice in the pod's GPU memory; the model "
            "answers UNAVAILABLE while the new one loads. False: the old one serves until the new one is READY."
        ),
    )
    faults: ServingFaults = Field(
        default_factory=ServingFaults,
        description="Fault injection for tests (added latency, injected errors); off by default.",
    )


class CacheSection(ServiceEndpoint):
    """Cache service settings; Redis itself is the top-level ``redis_url``.

    The same values configure the response cache wherever it runs: in the cache service and inside
    serving, which talks to Redis directly.
    """

    key_prefix: str = Field(
        default="llmops:cache:",
        min_length=1,
        max_length=64,
        description="Prefix of every Redis key the cache writes (entries, indexes, locks).",
    )
    default_ttl_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="Lifetime of a stored answer when the caller names none; 0: no expiry.",
    )
    max_ttl_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Longest lifetime a caller may ask for (0 and longer are capped); 0: no cap.",
    )
    max_entry_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest answer stored, serialized, in bytes."
    )
    redis_timeout_ms: int = Field(
        default=50,
        ge=1,
        le=60_000,
        description="Longest wait for one Redis operation (and connection); past it the cache fails open.",
    )
    failure_cooldown_ms: int = Field(
        default=1000,
        ge=0,
        le=600_000,
        description="After a Redis failure, skip Redis for this long (every call a fast miss); 0: retry at once.",
    )
    maxmemory_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        description="Redis maxmemory set at start (0: leave Redis's value); the instance should belong to the cache.",
    )
    maxmemory_policy: Literal[
        "allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "allkeys-random", "volatile-ttl"
    ] = Field(default="allkeys-lru", description="Redis eviction policy set at start.")
    configure_redis: bool = Field(
        default=True,
        description="CONFIG SET maxmemory and its policy at start; false (or a managed Redis that forbids CONFIG): only check and warn.",
    )
    single_flight_lock_ms: int = Field(
        default=2000,
        ge=50,
        le=600_000,
        description="Lifetime of the lock one computing request holds (renewed while it computes); a crashed holder is replaced after it.",
    )
    single_flight_wait_ms: int = Field(
        default=60_000,
        ge=0,
        description="Longest an identical request waits for the holder's answer before computing its own.",
    )
    single_flight_wait_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="A request with a deadline waits for the holder's answer at most this share of its remaining "
        "time (and single_flight_wait_ms), then computes its own: a slow holder never makes it miss its deadline.",
    )
    single_flight_poll_ms: int = Field(
        default=20,
        ge=1,
        le=10_000,
        description="Longest pause between a waiting request's looks for the answer.",
    )
    stats_refresh_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How often the cache service recounts entries and bytes for its gauges (a SCAN); 0: only on Stats.",
    )


class RouterSection(ServiceEndpoint):
    """Router settings: where the serving replicas are and how one is picked per request."""

    http_port: int = Field(
        default=8001,
        ge=0,
        description="Port of the router's OpenAI-compatible HTTP API (0 picks a free one).",
    )
    http_enabled: bool = Field(default=True, description="Serve the OpenAI-compatible HTTP API.")
    discovery: Literal["static", "dns", "kubernetes"] = Field(
        default="static",
        description="How replicas are found: the endpoints list, a headless Service's DNS name, or EndpointSlices.",
    )
    endpoints: list[str] = Field(
        default_factory=list,
        description="Static replicas' gRPC host:port (a list, or one comma-separated string).",
    )
    dns_name: str = Field(
        default="", description="dns: the headless Service's name (each A record is a replica)."
    )
    kubernetes_service: str = Field(
        default="",
        description="kubernetes: the Service whose EndpointSlices list the replicas, or a label selector (k=v,...) over several.",
    )
    kubernetes_namespace: str = Field(
        default="", description="kubernetes: its namespace; empty: the pod's own."
    )
    replica_port: int = Field(
        default=50054,
        ge=1,
        le=65535,
        description="dns/kubernetes: the replicas' gRPC port (kubernetes: unless the slice names a port 'grpc').",
    )
    discovery_refresh_seconds: float = Field(
        default=5.0, gt=0, description="dns: how often the name is resolved again."
    )
    policy: Literal["round_robin", "least_loaded", "prefix_affinity", "session_affinity"] = Field(
        default="prefix_affinity", description="Default policy; a request may override it with policy_header."
    )
    policy_header: str = Field(
        default="x-llmops-route-policy", description="Metadata key / HTTP header that overrides the policy."
    )
    session_header: str = Field(
        default="x-llmops-session-id", description="Metadata key / HTTP header naming a session."
    )
    prefix_block_chars: int = Field(
        default=256, ge=16, description="Characters per prompt block prefix affinity hashes."
    )
    prefix_max_blocks: int = Field(
        default=32, ge=1, description="Leading blocks of a prompt prefix affinity looks at."
    )
    prefix_table_size: int = Field(
        default=100_000, ge=100, description="Block hashes remembered (least recently used go first)."
    )
    saturation_waiting: int = Field(
        default=2, ge=0, description="Requests queued beyond a replica's slots at which affinity gives way."
    )
    load_interval_ms: int = Field(
        default=20, ge=1, le=10_000, description="Shortest pause between a replica's load reports."
    )
    stale_ms: int = Field(default=1000, ge=100, description="A replica silent this long leaves the rotation.")
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Replicas tried for one request that fails before its first answer.",
    )
    max_hold_seconds: float = Field(
        default=60.0, ge=0, description="Longest a request without a deadline waits for a ready replica."
    )
    traffic_split: bool = Field(
        default=False,
        description="Split each registry model's traffic by the registry's alias weights (registry.address).",
    )
    split_refresh_seconds: float = Field(
        default=2.0, gt=0, description="How often the alias weights of a routed model are read again."
    )
    cache_in_front: bool = Field(
        default=True, description="With redis_url set: answer deterministic requests from the response cache."
    )
    rollout_controller: bool = Field(
        default=False,
        description="Run the rollout controller here: it steps the registry's active rollouts (registry.address) "
        "on this router's per-version SLIs. One router replica (or one controller) per registry.",
    )
    rollout_poll_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How often the rollout controller looks at the active rollouts."
    )
    rollout_prometheus_url: str = Field(
        default="",
        description="Judge rollouts on Prometheus (PromQL over llmops_router_* from every router replica) "
        "instead of this router's own windows; e.g. http://prometheus:9090.",
    )

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return (
            [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        )


def _section(cls: type[ServiceEndpoint], port: int, metrics_port: int) -> Any:
    return Field(
        default_factory=lambda: cls(port=port, metrics_port=metrics_port, address=f"127.0.0.1:{port}"),
        description=f"{cls.__doc__}",
    )


class Settings(_Model):
    """Everything a process of the platform can be configured with."""

    host: str = Field(default="0.0.0.0", description="Interface the gRPC and metrics servers bind.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    log_format: Literal["json", "console"] = Field(default="console", description="Log line format.")
    grace_seconds: float = Field(
        default=30.0, ge=0, le=3600, description="How long a stopping server lets in-flight calls finish."
    )
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest gRPC message accepted or sent, in bytes.",
    )
    max_concurrent_rpcs: int | None = Field(
        default=None, ge=1, description="Calls served at once; beyond it callers get RESOURCE_EXHAUSTED."
    )
    health_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often readiness checks run to update grpc.health.v1."
    )
    data_dir: Path = Field(default=Path(".llmops"), description="Folder for local state (SQLite, artifacts).")
    model_cache_dir: Path | None = Field(
        default=None,
        description=(
            "Node-local cache of served versions' files, keyed by manifest sha256 (share it between the "
            "replicas of a node); unset: <data_dir>/serving/models."
        ),
    )
    redis_url: str | None = Field(default=None, description="redis://host:port/db of the cache and limits.")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow tracking/registry store URI.")
    mlflow_artifact_root: str | None = Field(default=None, description="MLflow artifact root (file or s3).")
    ray_address: str | None = Field(
        default=None, description="Ray cluster address; unset starts a local one."
    )
    ray_temp_dir: Path | None = Field(
        default=None, description="Temp folder of a local Ray runtime; unset: a new folder under /tmp."
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="YAML file of hashed API keys, tenants and their limits (see llmops.common.auth); unset: no auth.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="The API key this process (a service, the CLI) sends to the services it calls.",
    )
    rate_limit_fail_open: bool = Field(
        default=True,
        description="When Redis is unreachable, let calls through (true) or refuse them with UNAVAILABLE (false).",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain: gRPC servers serve TLS with it; clients present it for mTLS.",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle: servers require client certificates it signed (mutual TLS)."
    )
    tls_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle clients verify servers with; set it to make clients use TLS."
    )
    registry: RegistrySection = _section(RegistrySection, 50051, 9101)
    training: TrainingSection = _section(TrainingSection, 50052, 9102)
    quantization: QuantizationSection = _section(QuantizationSection, 50053, 9103)
    serving: ServingSection = _section(ServingSection, 50054, 9104)
    cache: CacheSection = _section(CacheSection, 50055, 9105)
    router: RouterSection = _section(RouterSection, 50056, 9106)

    def mlflow_locations(self) -> tuple[str, str | None]:
        """MLflow's tracking URI and artifact root with the ``data_dir`` defaults filled in.

        A local SQLite store keeps files beside it; a tracking server (or a shared database) keeps
        them where the server's default artifact root says (``None``), never on this pod's disk.
        """
        data_dir = self.data_dir.expanduser().absolute()
        tracking_uri = self.mlflow_tracking_uri or f"sqlite:///{data_dir / 'mlflow.db'}"
        local_default = (data_dir / "mlartifacts").as_uri() if tracking_uri.startswith("sqlite") else None
        return tracking_uri, self.mlflow_artifact_root or local_default

    def section(self, service: ServiceName) -> ServiceEndpoint:
        """The endpoint section of one service."""
        section: ServiceEndpoint = getattr(self, service)
        return section

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, config_file: Path | str | None = None) -> Settings:
        """Build settings from a file and ``LLMOPS_*`` variables; call once, in ``main()``.

        Args:
            env: the environment to read (``os.environ`` when omitted).
            config_file: a YAML file; when omitted, ``LLMOPS_CONFIG_FILE`` names one if set.

        Raises:
            SettingsError: naming each unknown or bad variable or key.
        """
        env = os.environ if env is None else env
        config_file = config_file or env.get("LLMOPS_CONFIG_FILE")
        data: dict[str, Any] = _read_file(Path(config_file)) if config_file else {}
        sources: dict[tuple[str, ...], str] = {}
        for var, raw in sorted(env.items()):
            if not var.startswith(ENV_PREFIX) or var in NON_SETTINGS_ENV:
                continue
            path = _env_path(var)
            if path is None:
                raise SettingsError(f"unknown setting {var}: no such field (check the spelling)")
            target = data
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = _parse_env_value(raw)
            sources[path] = var
        return cls._validate(data, sources, str(config_file) if config_file else None)

    @classmethod
    def from_file(cls, path: Path | str) -> Settings:
        """Settings from a YAML file alone (no environment)."""
        return cls._validate(_read_file(Path(path)), {}, str(path))

    @classmethod
    def _validate(
        cls, data: dict[str, Any], sources: dict[tuple[str, ...], str], file: str | None
    ) -> Settings:
        # Fill section defaults before validation so partial sections keep their per-service ports.
        for service in SERVICE_NAMES:
            if service in data and isinstance(data[service], dict):
                default = cls.model_fields[service].get_default(call_default_factory=True)
                merged = default.model_dump()
                merged.update(data[service])
                if "port" in data[service] and "address" not in data[service]:
                    merged["address"] = f"127.0.0.1:{data[service]['port']}"
                data[service] = merged
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                loc = tuple(str(part) for part in err["loc"])
                where = sources.get(loc) or (f"{file}: {'.'.join(loc)}" if file else ".".join(loc))
                value = (
                    f" (got {err['input']!r})"
                    if "input" in err and not isinstance(err["input"], dict)
                    else ""
                )
                problems.append(f"{where}: {err['msg']}{value}")
            raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None


def _env_path(var: str) -> tuple[str, ...] | None:
    name = var[len(ENV_PREFIX) :].lower()
    for service in SERVICE_NAMES:
        prefix = service + "_"
        if name.startswith(prefix):
            field = name[len(prefix) :]
            section_cls = Settings.model_fields[service].annotation
            if isinstance(section_cls, type) and field in section_cls.model_fields:
                return (service, field)
            # a field of a nested model: LLMOPS_SERVING_FAULTS__ERROR_RATIO -> serving.faults.error_ratio
            outer, _, inner = field.partition("__")
            if inner and isinstance(section_cls, type) and outer in section_cls.model_fields:
                nested = section_cls.model_fields[outer].annotation
                if (
                    isinstance(nested, type)
                    and issubclass(nested, BaseModel)
                    and inner in nested.model_fields
                ):
                    return (service, outer, inner)
    if name in Settings.model_fields and name not in SERVICE_NAMES:
        return (name,)
    return None


def _parse_env_value(raw: str) -> Any:
    stripped = raw.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return raw
    return raw


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError(f"settings file {path} must hold a mapping at the top level")
    return loaded
