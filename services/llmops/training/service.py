"""Training jobs on typed domain objects: submit, get, list, cancel and watch, with durable events.

Submission does every check before compute is spent (spec, base model, every dataset row), then
snapshots the dataset into the job's folder and queues the job. A scheduler keeps at most
``max_concurrent`` jobs on workers; each has a supervisor thread that starts an attempt on the
runner, turns the worker's events into job events (persisted, logged to MLflow, pushed to
watchers), and decides what happens next: a lost worker is resumed from the newest complete
checkpoint (up to ``max_attempts``), a finished one is registered, a cancel is asked for politely
and then enforced by killing the worker after ``cancel_grace_seconds``. Jobs left unfinished by a
previous process are resumed by :meth:`TrainingService.start`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmops.common.artifacts.sinks import ResultSink
from llmops.common.artifacts.sources import ModelSource
from llmops.common.datasets import DataRepository
from llmops.common.errors import FailedPrecondition, InvalidArgument, LLMOpsError, NotFound, ResourceExhausted
from llmops.common.jobs import follow_events
from llmops.common.runners import CancelDeadline
from llmops.training import data, validation
from llmops.training.checkpoints import latest_checkpoint
from llmops.training.domain import Job, JobEvent, JobState, RegisteredResult, TrainingSpec
from llmops.training.results import output_name, version_metadata
from llmops.training.runners import Attempt, JobRunner, Outcome
from llmops.training.store import JobStore
from llmops.training.tracking import Tracker, file_digest, metrics_of

log = logging.getLogger(__name__)
#: Phases after training, with the progress they report.
_PHASE_PROGRESS = {"load": 0.0, "export": 0.96, "register": 0.98}


@dataclasses.dataclass(frozen=True)
class Limits:
    max_concurrent: int = 1
    max_queued: int = 32
    max_attempts: int = 3
    cancel_grace_seconds: float = 10.0
    poll_seconds: float = 0.5


def _has_events(job_events: list[JobEvent], already_seen: int) -> bool:
    return len(job_events) > already_seen


class TrainingService:
    """The job book and the supervisors; transport-neutral."""

    def __init__(
        self,
        *,
        source: ModelSource,
        sink: ResultSink,
        runner: JobRunner,
        tracker: Tracker,
        repository: DataRepository,
        store: JobStore,
        limits: Limits = Limits(),
    ) -> None:
        self._source = source
        self._sink = sink
        self._runner = runner
        self._tracker = tracker
        self._repository = repository
        self._store = store
        self._limits = limits
        self._jobs: dict[str, Job] = {}
        self._events: dict[str, list[JobEvent]] = {}
        self._by_request: dict[tuple[str, str], str] = {}
        self._active: dict[str, threading.Thread] = {}
        self._attempts: dict[str, Attempt] = {}
        self._changed = threading.Condition()
        self._counter = itertools.count(1)
        self._closing = False

    # life ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Read persisted jobs back; queue again what had not finished (resuming from checkpoints)."""
        with self._changed:
            for job, events in self._store.load():
                self._jobs[job.id] = job
                self._events[job.id] = events
                if job.request_id:
                    self._by_request[(job.created_by, job.request_id)] = job.id
                if not job.state.terminal:
                    note = "the service restarted; the job is queued again"
                    if job.state is JobState.RUNNING and self._reattachable(job):
                        note = "the service restarted; it follows the job where it still runs"
                    elif job.state is JobState.RUNNING:
                        note += f" and resumes from step {job.checkpoint_step}"
                    self._emit(job, "log", level="warning", message=note)
            running = {j.id for j in self._jobs.values() if not j.state.terminal}
        for job_id in self._runner.reconcile(running):
            log.warning("stopped the workers of training job %s, which the job book does not run", job_id)
        with self._changed:
            self._schedule()

    def shutdown(self) -> None:
        """Stop supervising: running attempts are killed and stay RUNNING, to resume on the next start."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            threads = list(self._active.values())
        for thread in threads:
            thread.join(timeout=self._limits.poll_seconds * 4 + 30)
        self._runner.shutdown()

    # API -----------------------------------------------------------------------------------------

    @staticmethod
    def _reattachable(job: Job) -> bool:
        return job.plan is not None and job.plan.num_workers > 1 and job.attempt > 0

    def submit(self, spec: TrainingSpec, request_id: str = "", caller: str = "") -> Job:
        """Check everything, snapshot the data, queue the job (or return the one ``request_id`` made).

        Raises:
            InvalidArgument: a bad spec or a malformed dataset row (naming its line).
            NotFound: no such base model, dataset or revision.
            FailedPrecondition: something this server cannot train (QLoRA without a GPU...).
            ResourceExhausted: the queue is full.
        """
        if len(request_id.encode()) > 128:
            raise InvalidArgument("at most 128 bytes", field="request_id")
        with self._changed:
            if request_id and (caller, request_id) in self._by_request:
                return self._copy(self._jobs[self._by_request[(caller, request_id)]])
        validation.check_spec(spec)
        if spec.num_workers > (most := self._runner.max_workers()):
            raise FailedPrecondition(
                f"this server runs a job on at most {most} worker(s) (data-parallel jobs need the Ray runner)"
            )
        data.check_format(spec.data_format, spec.method)
        self._check_capacity()
        source = self._source.resolve(spec.base_name, spec.base_version, spec.base_alias)
        content, commit = self._repository.read(spec.dataset)
        data_format, _rows = data.validate_rows(content, spec.data_format, spec.method)
        context = validation.check_base_model(source.path, data_format)
        cuda, bf16 = self._runner.accelerator()
        job_id = f"tj-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
        job_dir = self._store.job_dir(job_id)
        plan = validation.build_plan(
            spec,
            job_id=job_id,
            data_format=data_format,
            base_dir=source.path.absolute(),
            dataset_file=(job_dir / "dataset.jsonl").absolute(),
            job_dir=job_dir.absolute(),
            context_length=context,
            cuda=cuda,
            bf16=bf16,
        )
        spec = dataclasses.replace(
            spec, base_name=source.name, base_version=source.version, base_alias=None, data_format=data_format
        )
        self._store.write_dataset(job_id, content)
        with self._changed:
            if request_id and (caller, request_id) in self._by_request:  # lost a race with a retry
                return self._copy(self._jobs[self._by_request[(caller, request_id)]])
            queued = self._check_capacity()
            job = Job(
                id=job_id,
                spec=spec,
                created_at=time.time(),
                created_by=caller,
                request_id=request_id,
                dataset_commit=commit,
                plan=plan,
            )
            self._jobs[job.id] = job
            self._events[job.id] = []
            if request_id:
                self._by_request[(caller, request_id)] = job.id
            self._emit(job, "queued", queue_position=queued)
            self._schedule()
            return self._copy(job)

    def get(self, job_id: str) -> Job:
        with self._changed:
            return self._copy(self._job(job_id))

    def list_jobs(self, states: frozenset[JobState] = frozenset(), output_model_name: str = "") -> list[Job]:
        """Jobs, newest first, optionally only in ``states`` / for one output model."""
        with self._changed:
            jobs = [
                j
                for j in self._jobs.values()
                if (not states or j.state in states)
                and (not output_model_name or output_name(j) == output_model_name)
            ]
            return [self._copy(j) for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]

    def cancel(self, job_id: str, reason: str = "", caller: str = "") -> Job:
        with self._changed:
            job = self._job(job_id)
            if job.state in (JobState.SUCCEEDED, JobState.FAILED):
                raise FailedPrecondition(f"job {job_id} already {job.state.value}")
            if job.state is JobState.CANCELLED or job.cancel_requested:
                return self._copy(job)
            job.cancel_requested, job.cancel_reason, job.cancelled_by = True, reason, caller
            if job.id not in self._active:  # still waiting in the queue: nothing to stop
                self._finish(job, JobState.CANCELLED, "cancelled", message=reason, cancelled_by=caller)
            else:
                self._store.save(job)
            self._changed.notify_all()
            return self._copy(job)

    def events_since(
        self, job_id: str, from_sequence: int = 0, timeout: float | None = None
    ) -> list[JobEvent]:
        """Events with ``sequence >= from_sequence``, waiting up to ``timeout`` s for the first one."""
        already_seen = max(from_sequence, 1) - 1
        with self._changed:
            self._job(job_id)
            events = self._events[job_id]
            self._changed.wait_for(functools.partial(_has_events, events, already_seen), timeout=timeout)
            return events[already_seen:]

    def watch(self, job_id: str, from_sequence: int = 0, timeout: float | None = None) -> Iterator[JobEvent]:
        """Events from ``from_sequence`` until the terminal one; ``TimeoutError`` after a silent ``timeout``."""
        return follow_events(self.events_since, job_id, from_sequence, timeout)

    def attempt(self, job_id: str) -> Attempt | None:
        """The running attempt of a job, for operators and fault-injection tests."""
        with self._changed:
            return self._attempts.get(job_id)

    # scheduling ----------------------------------------------------------------------------------

    def _check_capacity(self) -> int:
        """Jobs ahead in the queue; raises when it is full."""
        with self._changed:
            waiting = sum(1 for j in self._jobs.values() if j.state is JobState.QUEUED)
        if waiting >= self._limits.max_queued:
            raise ResourceExhausted(
                f"{waiting} training jobs are queued; retry later", retry_after_seconds=60
            )
        return waiting

    def _schedule(self) -> None:
        """Start supervisors for the oldest waiting jobs while there is room (caller holds the lock)."""
        if self._closing:
            return
        waiting = sorted(
            (j for j in self._jobs.values() if not j.state.terminal and j.id not in self._active),
            key=lambda j: (j.created_at, j.id),
        )
        for job in waiting:
            if len(self._active) >= self._limits.max_concurrent:
                return
            thread = threading.Thread(
                target=self._supervise, args=(job.id,), name=f"supervise-{job.id}", daemon=True
            )
            self._active[job.id] = thread
            thread.start()

    # supervision ---------------------------------------------------------------------------------

    def _supervise(self, job_id: str) -> None:
        job = self._jobs[job_id]
        try:
            outcome = self._attempts_until_done(job)
            if outcome is not None:
                self._conclude(job, outcome)
        except Exception as error:  # a bug or a dead dependency: the job fails, the server stays up
            log.exception("training job %s failed in its supervisor", job_id)
            message = error.message if isinstance(error, LLMOpsError) else f"{type(error).__name__}: {error}"
            self._end_run(job, "FAILED")
            with self._changed:
                if not job.state.terminal:
                    job.error_message = message.splitlines()[0][:500] if message else type(error).__name__
                    self._finish(job, JobState.FAILED, "failed", message=job.error_message)
        finally:
            with self._changed:
                self._active.pop(job_id, None)
                self._attempts.pop(job_id, None)
                self._schedule()

    def _attempts_until_done(self, job: Job) -> Outcome | None:
        assert job.plan is not None
        if not job.mlflow_run_id:
            digest = file_digest(Path(job.plan.dataset_file))
            run_id = self._tracker.start_run(job, job.plan, digest)
            with self._changed:
                job.mlflow_run_id = run_id
                self._store.save(job)
        while True:
            with self._changed:
                if job.cancel_requested:
                    return Outcome("cancelled")
                if self._closing:
                    return None
            attempt = self._reattach(job)
            if attempt is None:
                attempt = self._start_attempt(job)
            outcome = self._follow(job, attempt)
            if outcome is None:  # the service is stopping; the job resumes on the next start
                return None
            if outcome.kind != "lost":
                return outcome
            if job.cancel_requested:  # lost while stopping on request: it is cancelled, not failed
                return Outcome("cancelled")
            if job.attempt >= self._limits.max_attempts:
                return Outcome("failed", reason=f"{outcome.reason} (after {job.attempt} attempts)")
            with self._changed:
                self._emit(
                    job,
                    "log",
                    level="warning",
                    message=f"{outcome.reason}; resuming from the last checkpoint",
                )

    def _reattach(self, job: Job) -> Attempt | None:
        """The attempt a previous service left running (a data-parallel job's coordinator), if any."""
        if not (job.state is JobState.RUNNING and self._reattachable(job)):
            return None
        attempt = self._runner.reattach(job.id, job.events_cursor)
        if attempt is not None:
            with self._changed:
                self._attempts[job.id] = attempt
                self._emit(
                    job, "log", level="info", message=f"following attempt {job.attempt}, still running"
                )
        return attempt

    def _start_attempt(self, job: Job) -> Attempt:
        assert job.plan is not None
        if job.plan.num_workers > 1:  # Ray Train resumes from the run's checkpoints in its storage
            found, plan = None, job.plan
        else:
            found = latest_checkpoint(Path(job.plan.checkpoint_dir))
            plan = dataclasses.replace(job.plan, resume_from=str(found[1]) if found else None)
        attempt = self._runner.start(plan, job.spec.resources)
        with self._changed:
            job.attempt += 1
            if found is not None or job.plan.num_workers <= 1:
                job.checkpoint_step = found[0] if found else 0
            job.events_cursor = 0
            self._attempts[job.id] = attempt
            self._store.save(job)
        return attempt

    def _follow(self, job: Job, attempt: Attempt) -> Outcome | None:
        deadline = CancelDeadline(self._limits.cancel_grace_seconds)
        while True:
            with self._changed:
                closing, cancelling, started = (
                    self._closing,
                    job.cancel_requested,
                    job.state is JobState.RUNNING,
                )
            if closing:
                if not getattr(attempt, "detached", False):  # a detached one runs on without us
                    attempt.kill()
                return None
            if cancelling and (stopped := deadline.enforce(attempt, started)) is not None:
                return stopped
            events, outcome = attempt.poll(self._limits.poll_seconds)
            self._apply(job, events)
            if outcome is not None:
                return outcome

    def _apply(self, job: Job, raw_events: list[dict[str, Any]]) -> None:
        """Worker events -> job fields, job events, MLflow metrics."""
        tracked: list[tuple[int, dict[str, float]]] = []
        with self._changed:
            job.events_cursor += len(raw_events)  # saved with the first event emitted below
            for raw in raw_events:
                kind = raw.get("kind")
                if kind == "started":
                    job.state = JobState.RUNNING
                    job.started_at = job.started_at or raw.get("time", time.time())
                    self._emit(
                        job,
                        "started",
                        worker=str(raw.get("worker", "")),
                        attempt=job.attempt,
                        resumed_from_step=job.checkpoint_step,
                        mlflow_run_id=job.mlflow_run_id,
                    )
                elif kind == "step":
                    self._apply_step(job, raw)
                    if (values := metrics_of(raw)) and raw.get("step"):
                        tracked.append((int(raw["step"]), values))
                elif kind == "eval":
                    values = metrics_of(raw)
                    job.latest_metrics.update(values)
                    tracked.append((int(raw.get("step", 0)), values))
                    self._emit(
                        job,
                        "eval",
                        step=int(raw.get("step", 0)),
                        loss=float(raw.get("loss", 0.0)),
                        perplexity=float(raw.get("perplexity", 0.0)),
                        metrics=dict(raw.get("metrics", {})),
                    )
                elif kind == "checkpoint":
                    job.checkpoint_step, job.checkpoint_uri = int(raw["step"]), str(raw["uri"])
                    self._emit(job, "checkpoint", step=job.checkpoint_step, uri=job.checkpoint_uri)
                elif kind == "log":
                    self._emit(
                        job, "log", level=str(raw.get("level", "info")), message=str(raw.get("message", ""))
                    )
        for step, values in tracked:
            self._track(job, step, values)

    def _apply_step(self, job: Job, raw: dict[str, Any]) -> None:
        phase = str(raw.get("phase", "train"))
        total = int(raw.get("total_steps", 0)) or job.total_steps
        step = int(raw.get("step", job.current_step))
        job.total_steps, job.current_step = total, step
        if phase == "train":
            progress = 0.95 * step / total if total else 0.0
        else:
            progress = _PHASE_PROGRESS.get(phase, job.progress)
        job.progress = max(job.progress, progress)
        if "loss" in raw:
            job.latest_metrics.update(
                {"loss": float(raw["loss"]), "learning_rate": float(raw.get("learning_rate", 0.0))}
            )
            if raw.get("tokens_per_second"):
                job.latest_metrics["tokens_per_second"] = float(raw["tokens_per_second"])
        self._emit(
            job,
            "step",
            phase=phase,
            step=step,
            total_steps=total,
            loss=float(raw.get("loss", 0.0)),
            learning_rate=float(raw.get("learning_rate", 0.0)),
            tokens_per_second=float(raw.get("tokens_per_second", 0.0)),
            epoch=float(raw.get("epoch", 0.0)),
            metrics=dict(raw.get("metrics", {})),
        )

    def _track(self, job: Job, step: int, values: dict[str, float]) -> None:
        if not job.mlflow_run_id:
            return
        try:
            self._tracker.log_metrics(job.mlflow_run_id, step, values)
        except Exception as error:  # tracking trouble never stops training; it is reported
            log.warning("MLflow logging of job %s failed: %s", job.id, error)

    # conclusion ----------------------------------------------------------------------------------

    def _conclude(self, job: Job, outcome: Outcome) -> None:
        """Record how the job ended; its MLflow run is closed before watchers see the terminal event."""
        if outcome.kind == "succeeded":
            assert outcome.result is not None
            self._succeed(job, outcome.result)
            return
        cancelled = outcome.kind == "cancelled"
        self._end_run(job, "KILLED" if cancelled else "FAILED")
        with self._changed:
            if cancelled:
                self._finish(
                    job,
                    JobState.CANCELLED,
                    "cancelled",
                    message=job.cancel_reason,
                    cancelled_by=job.cancelled_by,
                )
            else:
                job.error_message = outcome.reason or "the worker failed"
                self._finish(job, JobState.FAILED, "failed", message=job.error_message, step=job.current_step)
        self._store.remove_scratch(job.id, keep_output=False)

    def _succeed(self, job: Job, result: dict[str, Any]) -> None:
        spec, plan = job.spec, job.plan
        assert plan is not None
        output_dir = Path(result["output_dir"])
        metrics = {k: float(v) for k, v in result.get("metrics", {}).items()}
        with self._changed:
            job.progress = max(job.progress, _PHASE_PROGRESS["register"])
            self._emit(job, "step", phase="register", step=job.current_step, total_steps=job.total_steps)
        if job.mlflow_run_id:
            try:
                step = int(result.get("step", job.current_step))
                self._tracker.log_metrics(job.mlflow_run_id, step, metrics)
                self._tracker.log_artifacts(job.mlflow_run_id, output_dir, "model")
            except Exception as error:  # the model is still registered; the gap is reported
                log.warning("MLflow logging of job %s's result failed: %s", job.id, error)
                with self._changed:
                    self._emit(job, "log", level="warning", message=f"MLflow did not take the files: {error}")
        registered = None
        if spec.register:
            assert spec.base_version is not None
            metadata = version_metadata(job, result, metrics)
            found = self._sink.register(metadata, output_dir)
            registered = RegisteredResult(found.name, found.version, found.uri)
        self._end_run(job, "FINISHED")
        output_uri = registered.uri if registered else output_dir.resolve().as_uri()
        self._store.remove_scratch(job.id, keep_output=registered is None)
        with self._changed:
            job.result, job.output_uri = registered, output_uri
            job.latest_metrics.update(metrics)
            self._finish(
                job, JobState.SUCCEEDED, "finished", metrics=metrics, result=registered, uri=output_uri
            )

    def _end_run(self, job: Job, status: str) -> None:
        if not job.mlflow_run_id:
            return
        try:
            self._tracker.end_run(job.mlflow_run_id, status)
        except Exception as error:
            log.warning("MLflow could not close the run of job %s: %s", job.id, error)

    # helpers -------------------------------------------------------------------------------------

    def _finish(self, job: Job, state: JobState, kind: str, **fields: Any) -> None:
        """Terminal transition (caller holds the lock)."""
        job.state, job.finished_at = state, time.time()
        if state is JobState.SUCCEEDED:
            job.progress = 1.0
        fields.setdefault("step", job.current_step)
        self._emit(job, kind, **fields)

    def _emit(self, job: Job, kind: str, **fields: Any) -> None:
        """Append, persist and publish an event (caller holds the lock)."""
        events = self._events[job.id]
        event = JobEvent(
            job_id=job.id,
            sequence=len(events) + 1,
            time=time.time(),
            state=job.state,
            kind=kind,  # type: ignore[arg-type]
            progress=job.progress,
            **fields,
        )
        events.append(event)
        self._store.append_events(job.id, [event])
        self._store.save(job)
        self._changed.notify_all()

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"training job {job_id} does not exist")
        return job

    @staticmethod
    def _copy(job: Job) -> Job:
        return dataclasses.replace(job, latest_metrics=dict(job.latest_metrics))
