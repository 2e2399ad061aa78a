"""Quantization jobs on typed domain objects: submit, get, list, cancel and watch, with events.

A job runs in a :class:`JobRunner` (a bounded local thread pool here; a Ray runner fits the same
interface): load and validate -> quantize -> evaluate -> register. Every state change and progress
step is an event with a per-job sequence number; watchers block on a condition until new events
arrive. Cancellation is cooperative: the worker checks between phases and in progress callbacks.
Each job gets an MLflow run (:mod:`llmops.quantization.tracking`) when it starts; the run is closed
FINISHED, FAILED or KILLED before the terminal event, so a watcher that sees it finds the run closed.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from llmops.common.jobs import JobState
from llmops.quantization import evaluate
from llmops.quantization.calibration import calibration_windows
from llmops.quantization.methods import QuantizationSpec, Quantizer, resolve
from llmops.quantization.methods.base import ensure_not_quantized, weight_bytes
from llmops.quantization.tracking import NullTracker, RunStatus, Tracker
from llmops.registry.sinks import RegisteredVersion, ResultSink, VersionMetadata

log = logging.getLogger(__name__)


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
    #: MLflow run the job logs to (created when it starts); empty when it is not tracked.
    mlflow_run_id: str = ""
    events: list[JobEvent] = dataclasses.field(default_factory=list)


class JobRunner(abc.ABC):
    """Runs job bodies somewhere (threads here; Ray tasks on a cluster)."""

    @abc.abstractmethod
    def submit(self, work: Callable[[], None]) -> None:
        """Start ``work`` eventually; must not block on it."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop accepting work and wait for running work to end."""


class ThreadJobRunner(JobRunner):
    """A local thread pool: quantization releases the GIL in torch kernels."""

    def __init__(self, max_workers: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="quantize")

    def submit(self, work: Callable[[], None]) -> None:
        self._pool.submit(work)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


class _Cancelled(Exception):
    pass


def _metrics(result: JobResult) -> dict[str, float]:
    """The result's numbers (sizes, ratio, perplexities, speeds) as registry metrics."""
    return {
        k: float(v)
        for k, v in dataclasses.asdict(result).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _has_events(job: Job, already_seen: int) -> bool:
    return len(job.events) > already_seen


class QuantizationService:
    """The job store and the job body; transport-neutral."""

    def __init__(
        self,
        quantizers: Mapping[str, Quantizer],
        sink: ResultSink,
        runner: JobRunner,
        work_dir: Path,
        max_pending: int = 8,
        tracker: Tracker | None = None,
    ) -> None:
        self._quantizers = quantizers
        self._sink = sink
        self._runner = runner
        self._tracker = tracker or NullTracker()
        self._work_dir = work_dir
        self._max_pending = max_pending
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[str, str] = {}
        self._changed = threading.Condition()
        self._counter = itertools.count(1)

    # API ---------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec, request_id: str = "") -> Job:
        """Validate and queue a job (or return the one already submitted with ``request_id``)."""
        if len(request_id.encode()) > 128:
            raise InvalidArgument("at most 128 bytes", field="request_id")
        with self._changed:
            if request_id and request_id in self._by_request:
                return self._copy(self._jobs[self._by_request[request_id]])
        _, checked = resolve(self._quantizers, spec.quantization)
        if not spec.source_dir.is_dir():
            raise NotFound(f"source {spec.source_name} has no model folder")
        ensure_not_quantized(spec.source_dir)
        spec = dataclasses.replace(spec, quantization=checked)
        with self._changed:
            pending = sum(1 for j in self._jobs.values() if not j.state.terminal)
            if pending >= self._max_pending:
                raise ResourceExhausted(f"{pending} jobs are pending; retry later", retry_after_seconds=30)
            job = Job(
                id=f"qj-{next(self._counter)}-{uuid.uuid4().hex[:8]}", spec=spec, created_at=time.time()
            )
            job.request_id = request_id
            self._jobs[job.id] = job
            if request_id:
                self._by_request[request_id] = job.id
            self._emit(job, "queued", message=f"position {pending + 1}")
            copy = self._copy(job)
        self._runner.submit(lambda: self._run(job.id))
        return copy

    def get(self, job_id: str) -> Job:
        with self._changed:
            return self._copy(self._job(job_id))

    def list_jobs(self, states: frozenset[JobState] = frozenset()) -> list[Job]:
        """Jobs, newest first, optionally only in ``states``."""
        with self._changed:
            jobs = [j for j in self._jobs.values() if not states or j.state in states]
            return [self._copy(j) for j in sorted(jobs, key=lambda j: j.created_at, reverse=True)]

    def cancel(self, job_id: str, reason: str = "") -> Job:
        with self._changed:
            job = self._job(job_id)
            if job.state in (JobState.SUCCEEDED, JobState.FAILED):
                raise FailedPrecondition(f"job {job_id} already {job.state.value}")
            if job.state is JobState.QUEUED:
                job.cancel_requested = True
                self._finish(job, JobState.CANCELLED, "cancelled", message=reason)
            elif job.state is JobState.RUNNING:
                job.cancel_requested = True
            return self._copy(job)

    def events_since(
        self, job_id: str, from_sequence: int = 0, timeout: float | None = None
    ) -> list[JobEvent]:
        """Events with ``sequence >= from_sequence``, waiting up to ``timeout`` s for the first one
        (``[]`` when none came). Raises ``NotFound`` for an unknown job."""
        already_seen = max(from_sequence, 1) - 1
        with self._changed:
            job = self._job(job_id)
            self._changed.wait_for(functools.partial(_has_events, job, already_seen), timeout=timeout)
            return job.events[already_seen:]

    def watch(self, job_id: str, from_sequence: int = 0, timeout: float | None = None) -> Iterator[JobEvent]:
        """Events with ``sequence >= from_sequence``, blocking for new ones until the terminal event.

        Raises:
            NotFound: no such job.
            TimeoutError: no new event within ``timeout`` seconds.
        """
        next_sequence = max(from_sequence, 1)
        while True:
            batch = self.events_since(job_id, next_sequence, timeout)
            if not batch:
                raise TimeoutError(f"no event from job {job_id} in {timeout} s")
            yield from batch
            next_sequence = batch[-1].sequence + 1
            if batch[-1].state.terminal:
                return

    # worker ------------------------------------------------------------------------------------

    def _run(self, job_id: str) -> None:
        with self._changed:
            job = self._jobs[job_id]
            if job.state is not JobState.QUEUED:
                return
            job.state, job.started_at = JobState.RUNNING, time.time()
        out_dir = self._work_dir / job_id
        try:
            self._start_run(job)
            result = self._execute(job, out_dir)
        except _Cancelled:
            shutil.rmtree(out_dir, ignore_errors=True)
            self._end_run(job, "KILLED")
            with self._changed:
                self._finish(job, JobState.CANCELLED, "cancelled")
            return
        except Exception as error:  # the job fails; the server stays up
            shutil.rmtree(out_dir, ignore_errors=True)
            self._end_run(job, "FAILED")
            message = error.message if hasattr(error, "message") else f"{type(error).__name__}: {error}"
            with self._changed:
                job.error_message = message.splitlines()[0][:500] if message else type(error).__name__
                self._finish(job, JobState.FAILED, "failed", message=job.error_message)
            return
        self._end_run(job, "FINISHED")
        with self._changed:
            job.result = result
            self._finish(
                job, JobState.SUCCEEDED, "finished", metrics=_metrics(result), registered=result.registered
            )

    def _execute(self, job: Job, out_dir: Path) -> JobResult:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = job.spec
        quantizer, qspec = resolve(self._quantizers, spec.quantization)
        tokenizer: Any = AutoTokenizer.from_pretrained(spec.source_dir)
        windows = None
        if spec.eval.num_samples:
            texts = evaluate.heldout_texts(path=spec.eval.text_path)
            windows = evaluate.token_windows(tokenizer, texts, spec.eval.num_samples, spec.eval.seq_len)
        calibration = None
        if qspec.calibration is not None:  # GPTQ/AWQ: text disjoint from the evaluation's
            self._step(job, "calibrate", 0.02)
            calibration = calibration_windows(
                tokenizer,
                qspec.calibration,
                context_length=getattr(tokenizer, "model_max_length", None),
                eval_text_path=spec.eval.text_path,
                eval_tokens=spec.eval.num_samples * spec.eval.seq_len,
            )
        tokens = spec.eval.throughput_tokens or None
        self._step(job, "evaluate", 0.05)
        before = evaluate.Measurement()
        if windows or tokens:
            source: Any = AutoModelForCausalLM.from_pretrained(spec.source_dir)
            before = evaluate.measure(source.eval(), tokenizer, windows, tokens)
            del source
        self._step(job, "quantize", 0.3)
        artifact = quantizer.quantize(
            spec.source_dir,
            out_dir,
            qspec,
            calibration=calibration,
            progress=lambda f: self._step(job, "quantize", 0.3 + 0.4 * f),
        )
        self._step(job, "evaluate", 0.7)
        after = evaluate.Measurement()
        # a method whose eval model is dequantized floats (GPTQ/AWQ) has its speed not measured
        after_tokens = tokens if quantizer.measures_speed else None
        if windows or after_tokens:
            after = evaluate.measure(quantizer.load_for_eval(out_dir), tokenizer, windows, after_tokens)
        size_before = weight_bytes(spec.source_dir)
        result = JobResult(
            size_bytes_before=size_before,
            size_bytes_after=artifact.size_bytes,
            size_ratio=artifact.size_bytes / size_before,
            format=artifact.format,
            output_dir=out_dir,
            perplexity_before=before.perplexity,
            perplexity_after=after.perplexity,
            tokens_per_second_before=before.tokens_per_second,
            tokens_per_second_after=after.tokens_per_second,
        )
        metrics = _metrics(result)
        self._track_result(job, metrics, out_dir)
        self._step(job, "register", 0.9, kind="eval", metrics=metrics)
        if not spec.register:
            return result
        tags = {**spec.tags, "quantization_method": qspec.method}
        if qspec.gguf_type:
            tags["gguf_type"] = qspec.gguf_type
        metadata = VersionMetadata(
            model_name=spec.output_model_name or f"{spec.source_name}-{qspec.method.replace('_', '-')}",
            parent_name=spec.source_name,
            parent_version=spec.source_version,
            description=spec.description or f"{spec.source_name} quantized with {qspec.method}",
            tags=tags,
            metrics=metrics,
            aliases=spec.aliases,
            format=artifact.format,
            job_id=job.id,
            dataset=qspec.calibration.dataset if qspec.calibration else None,
            mlflow_run_id=job.mlflow_run_id,
        )
        return dataclasses.replace(result, registered=self._sink.register(metadata, out_dir))

    # tracking ----------------------------------------------------------------------------------

    def _start_run(self, job: Job) -> None:
        """Create the job's MLflow run, then announce the start with its id. A store that cannot be
        reached fails the job (``Unavailable``)."""
        run_id = self._tracker.start_run(job)
        with self._changed:
            job.mlflow_run_id = run_id
            self._emit(job, "started", phase="load", mlflow_run_id=run_id)

    def _track_result(self, job: Job, metrics: Mapping[str, float], out_dir: Path) -> None:
        """Log the measurements and the result's files; trouble here only warns."""
        if not job.mlflow_run_id:
            return
        try:
            self._tracker.log_metrics(job.mlflow_run_id, 0, metrics)
            self._tracker.log_artifacts(job.mlflow_run_id, out_dir, "model")
        except Exception as error:
            log.warning("MLflow logging of quantization job %s failed: %s", job.id, error)

    def _end_run(self, job: Job, status: RunStatus) -> None:
        """Close the job's run; called before the terminal event so watchers find it closed."""
        if not job.mlflow_run_id:
            return
        try:
            self._tracker.end_run(job.mlflow_run_id, status)
        except Exception as error:
            log.warning("MLflow could not close the run of quantization job %s: %s", job.id, error)

    # helpers -----------------------------------------------------------------------------------

    def _step(
        self,
        job: Job,
        phase: str,
        progress: float,
        kind: str = "step",
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        with self._changed:
            if job.cancel_requested:
                raise _Cancelled
            job.phase, job.progress = phase, max(job.progress, progress)
            self._emit(job, kind, phase=phase, metrics=metrics or {})

    def _finish(
        self,
        job: Job,
        state: JobState,
        kind: str,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
        registered: RegisteredVersion | None = None,
    ) -> None:
        job.state, job.finished_at = state, time.time()
        if state is JobState.SUCCEEDED:
            job.progress = 1.0
        self._emit(job, kind, message=message, metrics=metrics, registered=registered)

    def _emit(
        self,
        job: Job,
        kind: str,
        phase: str = "",
        message: str = "",
        metrics: Mapping[str, float] | None = None,
        registered: RegisteredVersion | None = None,
        mlflow_run_id: str = "",
    ) -> None:
        """Append an event (caller holds the condition) and wake watchers."""
        job.events.append(
            JobEvent(
                job_id=job.id,
                sequence=len(job.events) + 1,
                time=time.time(),
                state=job.state,
                kind=kind,
                progress=job.progress,
                phase=phase or job.phase,
                message=message,
                metrics=dict(metrics or {}),
                registered=registered,
                mlflow_run_id=mlflow_run_id,
            )
        )
        self._changed.notify_all()

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        return job

    @staticmethod
    def _copy(job: Job) -> Job:
        return dataclasses.replace(job, events=list(job.events))
