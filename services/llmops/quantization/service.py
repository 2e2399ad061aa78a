"""Quantization jobs on typed domain objects: submit, get, list, cancel and watch, with events.

What a job is (its spec, record, events and result) lives in :mod:`llmops.quantization.domain`.
A job's body (:mod:`llmops.quantization.worker`: load, evaluate, quantize, evaluate) runs on a
runner of :mod:`llmops.common.runners`, the code that runs training jobs too: a Ray actor per job
(on a local runtime, or the cluster at ``ray_address``), or a thread of this process. A
:class:`~llmops.quantization.dispatch.Dispatcher` (a bounded thread pool: ``quantization.workers``
jobs at once) runs one
supervisor per job, which opens the job's MLflow run (:mod:`llmops.quantization.tracking`), starts
the attempt, turns the worker's events into job events (numbered per job; watchers block on a
condition until new ones arrive), and concludes: the measurements are logged and the result folder
registered here, in the service, never in the worker.

A job is RUNNING from when its supervisor takes it (its run is open); its ``started`` event says
when the worker began and where (``<host> pid <pid>``). Cancelling a queued job ends it at once; a
running one is asked to stop (the worker checks between phases and at every progress report of the
quantizer), and its worker is killed if it has not stopped ``cancel_grace_seconds`` later, which
frees its Ray resources. A worker that dies mid-job (killed, out of memory, node lost) fails the job
with that reason: the job keeps no checkpoint to resume from, and the usual cause (memory) would
strike again, so it is not retried. The run is closed FINISHED, FAILED or KILLED before the terminal
event, so a watcher that sees that event finds the run closed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from llmops.common.artifacts.sinks import RegisteredVersion, ResultSink, VersionMetadata
from llmops.common.datasets import DataRepository
from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from llmops.common.jobs import JobState, follow_events
from llmops.common.runners import Attempt, CancelDeadline, JobRunner, Outcome
from llmops.common.runners.local import ThreadRunner
from llmops.quantization import worker
from llmops.quantization.calibration import snapshot_calibration
from llmops.quantization.dispatch import Dispatcher
from llmops.quantization.domain import Job, JobEvent, JobResult, JobSpec, Limits
from llmops.quantization.methods import Quantizer, resolve
from llmops.quantization.methods.base import ensure_not_quantized
from llmops.quantization.tracking import NullTracker, RunStatus, Tracker

log = logging.getLogger(__name__)
#: Progress once the result is measured, while it is registered.
_REGISTER_PROGRESS = 0.9
#: Why a job that was running when the service stopped failed.
_STOPPED = "the quantization service stopped before the job finished"


def _metrics(result: JobResult) -> dict[str, float]:
    """The result's numbers (sizes, ratio, perplexities, speeds) as registry metrics."""
    return {
        k: float(v)
        for k, v in dataclasses.asdict(result).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)


def _has_events(job: Job, already_seen: int) -> bool:
    return len(job.events) > already_seen


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:500] if lines else ""


class QuantizationService:
    """The job book and the supervisors; transport-neutral.

    ``runner`` is where job bodies run; by default a thread of this process that quantizes with
    ``quantizers`` (a Ray runner's workers use :func:`~llmops.quantization.methods.default_quantizers`).
    ``repository`` is the DVC data repository that calibration references with a revision are read
    from (``None``: such jobs are refused with FAILED_PRECONDITION).
    """

    def __init__(
        self,
        quantizers: Mapping[str, Quantizer],
        sink: ResultSink,
        dispatcher: Dispatcher,
        work_dir: Path,
        max_pending: int = 8,
        tracker: Tracker | None = None,
        *,
        runner: JobRunner | None = None,
        limits: Limits | None = None,
        repository: DataRepository | None = None,
    ) -> None:
        self._quantizers = quantizers
        self._sink = sink
        self._dispatcher = dispatcher
        self._runner = runner or ThreadRunner(functools.partial(worker.run, quantizers=quantizers))
        self._tracker = tracker or NullTracker()
        self._work_dir = work_dir
        self._max_pending = max_pending
        self._limits = limits or Limits()
        self._repository = repository
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[str, str] = {}
        self._attempts: dict[str, Attempt] = {}
        self._changed = threading.Condition()
        self._counter = itertools.count(1)
        self._closing = False

    def shutdown(self) -> None:
        """Stop: running jobs' workers are killed (the jobs fail), then the runner is released."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._dispatcher.shutdown()
        self._runner.shutdown()

    # API ---------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec, request_id: str = "") -> Job:
        """Validate and queue a job (or return the one already submitted with ``request_id``)."""
        if len(request_id.encode()) > 128:
            raise InvalidArgument("at most 128 bytes", field="request_id")
        with self._changed:
            if request_id and request_id in self._by_request:
                return self._copy(self._jobs[self._by_request[request_id]])
        _, checked = resolve(self._quantizers, spec.quantization)
        resources = spec.resources
        if any(
            v < 0 or not math.isfinite(v) for v in (resources.cpus, resources.gpus, resources.memory_bytes)
        ):
            raise InvalidArgument("must be >= 0", field="spec.resources")
        if not spec.source_dir.is_dir():
            raise NotFound(f"source {spec.source_name} has no model folder")
        ensure_not_quantized(spec.source_dir)
        job_id = f"qj-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
        if checked.calibration is not None and checked.calibration.versioned:
            # read once, now: every later step (and the lineage) sees exactly these bytes
            calibration = snapshot_calibration(
                self._repository, checked.calibration, self._calibration_dir(job_id)
            )
            checked = dataclasses.replace(checked, calibration=calibration)
        spec = dataclasses.replace(spec, quantization=checked)
        with self._changed:
            pending = sum(1 for j in self._jobs.values() if not j.state.terminal)
            if pending >= self._max_pending:
                shutil.rmtree(self._calibration_dir(job_id), ignore_errors=True)
                raise ResourceExhausted(f"{pending} jobs are pending; retry later", retry_after_seconds=30)
            job = Job(id=job_id, spec=spec, created_at=time.time())
            job.request_id = request_id
            self._jobs[job.id] = job
            if request_id:
                self._by_request[request_id] = job.id
            self._emit(job, "queued", message=f"position {pending + 1}")
            copy = self._copy(job)
        self._dispatcher.submit(functools.partial(self._supervise, job.id))
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
        """End a queued job now; ask a running one's worker to stop (killed after the grace)."""
        attempt = None
        with self._changed:
            job = self._job(job_id)
            if job.state in (JobState.SUCCEEDED, JobState.FAILED):
                raise FailedPrecondition(f"job {job_id} already {job.state.value}")
            if job.state is JobState.QUEUED:
                job.cancel_requested, job.cancel_reason = True, reason
                self._finish(job, JobState.CANCELLED, "cancelled", message=reason)
            elif job.state is JobState.RUNNING and not job.cancel_requested:
                job.cancel_requested, job.cancel_reason = True, reason
                attempt = self._attempts.get(job.id)
                self._changed.notify_all()
            copy = self._copy(job)
        if attempt is not None:  # at once, rather than at the supervisor's next look
            attempt.request_cancel()
        return copy

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
        return follow_events(self.events_since, job_id, from_sequence, timeout)

    def attempt(self, job_id: str) -> Attempt | None:
        """The running attempt of a job, for operators and fault-injection tests."""
        with self._changed:
            return self._attempts.get(job_id)

    # supervision -------------------------------------------------------------------------------

    def _calibration_dir(self, job_id: str) -> Path:
        """Where a job's calibration snapshot lives (removed when its supervisor ends)."""
        return self._work_dir / "calibration" / job_id

    def _supervise(self, job_id: str) -> None:
        try:
            self._supervise_job(job_id)
        finally:
            shutil.rmtree(self._calibration_dir(job_id), ignore_errors=True)

    def _supervise_job(self, job_id: str) -> None:
        with self._changed:
            job = self._jobs[job_id]
            if job.state is not JobState.QUEUED or self._closing:
                return
            job.state, job.started_at = JobState.RUNNING, time.time()
        out_dir = self._work_dir / job_id
        try:
            self._conclude(job, self._run_attempt(job, out_dir), out_dir)
        # the tracking store, the sink, Ray or a bug: the job fails, the server stays up
        except Exception as error:
            with self._changed:
                attempt = self._attempts.get(job_id)
            if attempt is not None:  # a worker left running would hold its resources
                attempt.kill()
            shutil.rmtree(out_dir, ignore_errors=True)
            self._end_run(job, "FAILED")
            message = error.message if hasattr(error, "message") else f"{type(error).__name__}: {error}"
            with self._changed:
                if not job.state.terminal:
                    job.error_message = _first_line(message) or type(error).__name__
                    self._finish(job, JobState.FAILED, "failed", message=job.error_message)
        finally:
            with self._changed:
                self._attempts.pop(job_id, None)

    def _run_attempt(self, job: Job, out_dir: Path) -> Outcome:
        """Open the job's run, start its worker and follow it to its outcome."""
        self._start_run(job)
        with self._changed:
            if job.cancel_requested:
                return Outcome("cancelled")
        spec = job.spec
        quantization = spec.quantization
        if quantization.calibration is not None and quantization.calibration.text_path is not None:
            calibration = dataclasses.replace(
                quantization.calibration, text_path=quantization.calibration.text_path.absolute()
            )
            quantization = dataclasses.replace(quantization, calibration=calibration)
        plan = worker.Plan(  # paths absolute: a worker process need not share this one's folder
            job_id=job.id,
            source_dir=spec.source_dir.absolute(),
            out_dir=out_dir.absolute(),
            quantization=quantization,
            eval_samples=spec.eval.num_samples,
            eval_seq_len=spec.eval.seq_len,
            eval_text_path=spec.eval.text_path.absolute() if spec.eval.text_path else None,
            throughput_tokens=spec.eval.throughput_tokens,
        )
        resources = spec.resources
        if spec.quantization.device == "cuda" and not resources.gpus:
            resources = dataclasses.replace(resources, gpus=1.0)
        attempt = self._runner.start(job.id, plan.to_dict(), resources)
        with self._changed:
            self._attempts[job.id] = attempt
            cancelled_meanwhile = job.cancel_requested
        if cancelled_meanwhile:
            attempt.request_cancel()
        return self._follow(job, attempt)

    def _follow(self, job: Job, attempt: Attempt) -> Outcome:
        """Poll the worker's events until it ends; a cancel is asked for, then enforced by a kill."""
        deadline = CancelDeadline(self._limits.cancel_grace_seconds)
        started = False
        while True:
            with self._changed:
                closing, cancelling = self._closing, job.cancel_requested
            if closing:
                attempt.kill()
                return Outcome("failed", reason=_STOPPED)
            if cancelling and (stopped := deadline.enforce(attempt, started)) is not None:
                return stopped
            events, outcome = attempt.poll(self._limits.poll_seconds)
            started = self._apply(job, events) or started
            if outcome is not None:
                return outcome

    def _apply(self, job: Job, raw_events: list[dict[str, Any]]) -> bool:
        """Worker events -> job fields and job events; whether the worker's start was among them."""
        started = False
        with self._changed:
            for raw in raw_events:
                kind = raw.get("kind")
                if kind == "started":
                    started = True
                    self._emit(
                        job,
                        "started",
                        phase="load",
                        mlflow_run_id=job.mlflow_run_id,
                        worker=str(raw.get("worker", "")),
                    )
                elif kind == "step":
                    job.phase = str(raw.get("phase", job.phase))
                    job.progress = max(job.progress, float(raw.get("progress", 0.0)))
                    self._emit(job, "step", phase=job.phase)
                elif kind == "log":  # the worker's failure line; the failed event carries it too
                    log.info("quantization job %s: %s", job.id, raw.get("message", ""))
        return started

    # conclusion --------------------------------------------------------------------------------

    def _conclude(self, job: Job, outcome: Outcome, out_dir: Path) -> None:
        if outcome.kind == "succeeded" and not job.cancel_requested:
            assert outcome.result is not None
            self._succeed(job, outcome.result, out_dir)
            return
        shutil.rmtree(out_dir, ignore_errors=True)
        if job.cancel_requested or outcome.kind == "cancelled":
            # however its worker ended (done, lost while stopping...), a job stopped on request is
            # cancelled, and its result is not registered
            self._end_run(job, "KILLED")
            with self._changed:
                self._finish(job, JobState.CANCELLED, "cancelled", message=job.cancel_reason)
            return
        reason = outcome.reason or "the worker failed"
        if outcome.kind == "lost":
            reason += " (quantization jobs are not retried; submit it again)"
        self._end_run(job, "FAILED")
        with self._changed:
            job.error_message = _first_line(reason)
            self._finish(job, JobState.FAILED, "failed", message=job.error_message)

    def _succeed(self, job: Job, raw: Mapping[str, Any], out_dir: Path) -> None:
        """Log the measurements, register the folder (a failure here fails the job), finish."""
        spec = job.spec
        before, after = int(raw["size_bytes_before"]), int(raw["size_bytes_after"])
        result = JobResult(
            size_bytes_before=before,
            size_bytes_after=after,
            size_ratio=after / before,
            format=str(raw["format"]),
            output_dir=out_dir,
            perplexity_before=_optional(raw.get("perplexity_before")),
            perplexity_after=_optional(raw.get("perplexity_after")),
            tokens_per_second_before=_optional(raw.get("tokens_per_second_before")),
            tokens_per_second_after=_optional(raw.get("tokens_per_second_after")),
        )
        metrics = _metrics(result)
        self._track_result(job, metrics, out_dir)
        with self._changed:
            job.phase, job.progress = "register", max(job.progress, _REGISTER_PROGRESS)
            self._emit(job, "eval", phase="register", metrics=metrics)
        if spec.register:
            qspec = spec.quantization
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
                format=result.format,
                job_id=job.id,
                dataset=qspec.calibration.dataset if qspec.calibration else None,
                dataset_commit=qspec.calibration.dataset_commit if qspec.calibration else "",
                mlflow_run_id=job.mlflow_run_id,
            )
            result = dataclasses.replace(result, registered=self._sink.register(metadata, out_dir))
        self._end_run(job, "FINISHED")
        with self._changed:
            job.result = result
            self._finish(job, JobState.SUCCEEDED, "finished", metrics=metrics, registered=result.registered)

    # tracking ----------------------------------------------------------------------------------

    def _start_run(self, job: Job) -> None:
        """Create the job's MLflow run (its id goes on the ``started`` event). A store that cannot be
        reached fails the job (``Unavailable``)."""
        run_id = self._tracker.start_run(job)
        with self._changed:
            job.mlflow_run_id = run_id

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

    def _finish(
        self,
        job: Job,
        state: JobState,
        kind: str,
        message: str = "",
        metrics: Mapping[str, float] | None = None,
        registered: RegisteredVersion | None = None,
    ) -> None:
        """Terminal transition (caller holds the condition)."""
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
        worker: str = "",
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
                worker=worker,
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
