"""Typed domain objects of the quantization service: what a job asks for, what it is, what it emits.

The service (:mod:`llmops.quantization.service`) keeps the job book of these; its MLflow tracking
(:mod:`llmops.quantization.tracking`) and the gRPC adapter read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from llmops.common.artifacts.sinks import RegisteredVersion
from llmops.common.jobs import JobState
from llmops.common.runners import Resources
from llmops.quantization import evaluate
from llmops.quantization.methods import QuantizationSpec


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What to measure; ``num_samples == 0`` skips perplexity, ``throughput_tokens == 0`` speed."""

    num_samples: int = 0
    seq_len: int = evaluate.DEFAULT_SEQ_LEN
    throughput_tokens: int = 0
    text_path: Path | None = None


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A job as submitted: a source folder (resolved from the registry by the caller) and how."""

    source_dir: Path
    source_name: str
    quantization: QuantizationSpec
    source_version: int | None = None
    eval: EvalSpec = EvalSpec()
    output_model_name: str = ""
    register: bool = True
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""
    #: What the job's worker asks for; zero: the runner's default (one GPU for a CUDA job).
    resources: Resources = Resources()


@dataclasses.dataclass(frozen=True)
class JobEvent:
    job_id: str
    sequence: int
    time: float
    state: JobState
    kind: str  # "queued" | "started" | "step" | "eval" | "finished" | "failed" | "cancelled"
    progress: float = 0.0
    phase: str = ""
    message: str = ""
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: On the "finished" event: the registered result, if it was registered.
    registered: RegisteredVersion | None = None
    #: On the "started" event: the job's MLflow run; empty when it is not tracked.
    mlflow_run_id: str = ""
    #: On the "started" event: where the body runs (``<host> pid <pid>``).
    worker: str = ""


@dataclasses.dataclass(frozen=True)
class JobResult:
    size_bytes_before: int
    size_bytes_after: int
    size_ratio: float
    format: str
    output_dir: Path
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    tokens_per_second_before: float | None = None
    tokens_per_second_after: float | None = None
    registered: RegisteredVersion | None = None


@dataclasses.dataclass
class Job:
    """A job's mutable record; the service hands out copies."""

    id: str
    spec: JobSpec
    created_at: float
    request_id: str = ""
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    phase: str = ""
    result: JobResult | None = None
    error_message: str = ""
    cancel_requested: bool = False
    cancel_reason: str = ""
    #: MLflow run the job logs to (created when it starts); empty when it is not tracked.
    mlflow_run_id: str = ""
    events: list[JobEvent] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Limits:
    #: How long a cancelled job's worker may take to stop before it is killed.
    cancel_grace_seconds: float = 10.0
    #: Longest wait for a worker's events in one poll (the supervisor checks for cancels between).
    poll_seconds: float = 0.5
