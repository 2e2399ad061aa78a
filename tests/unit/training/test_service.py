"""The training job core: what a caller sees of a job, from submission to its terminal state.

Invariants: a job's events are numbered 1..n from ``queued`` to exactly one terminal event, each
with the job's state at the time, and its progress never goes back and ends at 1.0 on success; the
result is registered as a child version whose lineage names the base, the data, the job and (for
an adapter) the version it applies to; a lost worker is resumed from the newest COMPLETE
checkpoint until ``max_attempts`` is spent; a failing worker fails the job with one line, never a
traceback; a cancel stops a queued job at once and a running one politely, then by force after the
grace; a full queue is RESOURCE_EXHAUSTED with a retry delay; a request_id is idempotent per
caller; and a new service over the same job folder carries on where the old one stopped.

Collaborators are real but local (model folders, a directory sink, a plain data folder, the job
store, no tracking); the worker is a scripted fake runner, or the real thread runner around a fake
job body, so no test trains a model, starts Ray or opens a socket.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from llmops.common.artifacts.sinks import LocalDirectorySink
from llmops.common.artifacts.sources import LocalModelSource
from llmops.common.datasets import DataRepository
from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from llmops.training.domain import (
    DatasetRef,
    Hyperparameters,
    JobEvent,
    JobState,
    LoraSpec,
    Resources,
    TrainingSpec,
    WorkerPlan,
)
from llmops.training.runners.base import Attempt, JobRunner, Outcome
from llmops.training.runners.local import ThreadRunner
from llmops.training.service import Limits, TrainingService
from llmops.training.store import JobStore
from llmops.training.tracking import NullTracker
from llmops.training.worker import Cancelled

#: Seconds a test waits for something the service does before calling it a hang.
DEADLINE = 10.0
PC_ROWS = [{"prompt": f"def add_{i}(x):\n", "completion": f"    return x + {i}\n"} for i in range(6)]
CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


# the fake worker ----------------------------------------------------------------------------------


def write_result(plan: WorkerPlan, step: int, data_format: str | None = None) -> dict[str, Any]:
    """What a worker leaves behind: the output folder with a weights file, and the result dict."""
    output = Path(plan.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    name = "adapter_model.safetensors" if plan.registers_adapter else "model.safetensors"
    (output / name).write_bytes(b"weights of " + plan.job_id.encode())
    return {
        "output_dir": str(output),
        "format": data_format or ("adapter" if plan.registers_adapter else "fp32"),
        "metrics": {"train_loss": 0.5},
        "parameter_count": 1234,
        "step": step,
    }


def write_checkpoint(plan: WorkerPlan, step: int, complete: bool = True) -> str:
    folder = Path(plan.checkpoint_dir) / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"partial weights")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder.resolve().as_uri()


def step_event(step: int, total: int) -> dict[str, Any]:
    return {
        "kind": "step",
        "phase": "train",
        "step": step,
        "total_steps": total,
        "loss": 2.0 / step,
        "learning_rate": 1e-4,
        "tokens_per_second": 500.0 + step,
        "epoch": step / total,
    }


@dataclasses.dataclass
class Script:
    """One attempt of the fake worker: ``started``, steps (with checkpoints), then how it ends."""

    first_step: int = 1
    last_step: int = 4
    total_steps: int = 0  # 0: last_step
    checkpoints: tuple[int, ...] = ()
    end: Literal["succeeded", "failed", "lost"] = "succeeded"
    reason: str = ""
    #: When given, the attempt keeps running (after its events) until this is set.
    hold: threading.Event | None = None
    #: Whether a cancel request ends the attempt (``cancelled``) or is ignored until a kill.
    honours_cancel: bool = True
    #: Called with the plan when the attempt starts (to leave files on disk).
    on_start: Callable[[WorkerPlan], None] | None = None
    #: The worker never comes up (waiting for resources): no event at all, not even ``started``.
    never_starts: bool = False


class ScriptedAttempt(Attempt):
    def __init__(self, plan: WorkerPlan, script: Script) -> None:
        self.plan = plan
        self.script = script
        self.cancel_requested = threading.Event()
        self.killed = threading.Event()
        self.calls: list[str] = []
        if script.on_start is not None:
            script.on_start(plan)
        total = script.total_steps or script.last_step
        self._pending: list[dict[str, Any]] = [{"kind": "started", "worker": "fake-node pid 1"}]
        for step in range(script.first_step, script.last_step + 1):
            self._pending.append(step_event(step, total))
            if step in script.checkpoints:
                self._pending.append(
                    {"kind": "checkpoint", "step": step, "uri": write_checkpoint(plan, step)}
                )
        if script.never_starts:
            self._pending = []

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], Outcome | None]:
        events, self._pending = self._pending, []
        script = self.script
        if self.killed.is_set():
            return events, Outcome("cancelled")
        if script.honours_cancel and self.cancel_requested.is_set():
            return events, Outcome("cancelled")
        if script.hold is not None and not script.hold.is_set():
            if not events:
                script.hold.wait(timeout)
            return events, None
        if script.end == "succeeded":
            return events, Outcome("succeeded", result=write_result(self.plan, script.last_step))
        return events, Outcome(script.end, reason=script.reason)

    def request_cancel(self) -> None:
        self.calls.append("request_cancel")
        self.cancel_requested.set()

    def kill(self) -> None:
        self.calls.append("kill")
        self.killed.set()


class FakeRunner(JobRunner):
    """Starts one scripted attempt per call, taking the scripts in order (then ``default``)."""

    def __init__(self, *scripts: Script, default: Script | None = None) -> None:
        self.scripts = list(scripts)
        self.default = default or Script()
        self.attempts: list[ScriptedAttempt] = []

    def start(self, plan: WorkerPlan, resources: Resources) -> Attempt:
        attempt = ScriptedAttempt(plan, self.scripts.pop(0) if self.scripts else self.default)
        self.attempts.append(attempt)
        return attempt


# the stack ----------------------------------------------------------------------------------------


def spec(method: Any = "lora", path: str = "data/sft.jsonl", **fields: Any) -> TrainingSpec:
    fields.setdefault("lora", LoraSpec() if method in ("lora", "qlora") else None)
    fields.setdefault("hyperparameters", Hyperparameters(max_steps=4, logging_every_steps=1))
    return TrainingSpec(base_name="tiny", base_version=1, dataset=DatasetRef(path), method=method, **fields)


@dataclasses.dataclass
class Stack:
    root: Path
    services: list[TrainingService]

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    def service(self, runner: JobRunner, start: bool = False, **limits: Any) -> TrainingService:
        service = TrainingService(
            source=LocalModelSource(self.root / "models", field="spec.base_model"),
            sink=LocalDirectorySink(self.registry),
            runner=runner,
            tracker=NullTracker(),
            repository=DataRepository(self.root / "data"),
            store=JobStore(self.root / "jobs"),
            limits=Limits(**{"poll_seconds": 0.01, "cancel_grace_seconds": 0.2, **limits}),
        )
        self.services.append(service)
        if start:
            service.start()
        return service


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """``tiny/1`` is only a config and a tokenizer config: submission reads nothing else."""
    base = tmp_path / "models" / "tiny" / "1"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    plain = tmp_path / "models" / "plain" / "1"
    plain.mkdir(parents=True)
    (plain / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    data = tmp_path / "data" / "data"
    data.mkdir(parents=True)
    (data / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PC_ROWS))
    (data / "chat.jsonl").write_text(json.dumps(CHAT_ROW) + "\n")
    (data / "bad.jsonl").write_text(json.dumps(PC_ROWS[0]) + "\n" + '{"prompt": "x"}\n')
    found = Stack(tmp_path, [])
    yield found
    for service in found.services:
        service.shutdown()


def all_events(service: TrainingService, job_id: str) -> list[JobEvent]:
    return list(service.watch(job_id, timeout=DEADLINE))


def wait_for_event(service: TrainingService, job_id: str, kind: str) -> JobEvent:
    for event in service.watch(job_id, timeout=DEADLINE):
        if event.kind == kind:
            return event
    raise AssertionError(f"job {job_id} ended without a {kind} event")


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        threading.Event().wait(0.005)


def assert_well_formed(events: list[JobEvent]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].kind == "queued" and events[0].state is JobState.QUEUED
    assert [e.state.terminal for e in events] == [False] * (len(events) - 1) + [True]
    progress = [e.progress for e in events]
    assert progress == sorted(progress), progress


def version_record(stack: Stack, name: str, version: int = 1) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((stack.registry / name / str(version) / "version.json").read_text())
    return record


# thread runner + fake bodies ----------------------------------------------------------------------


def steady_body(
    plan: WorkerPlan, emit: Callable[[dict[str, Any]], None], stop: threading.Event
) -> dict[str, Any]:
    emit({"kind": "step", "phase": "load", "progress": 0.0})
    for step in range(1, 5):
        emit(step_event(step, 4))
        if step == 2:
            emit({"kind": "checkpoint", "step": 2, "uri": write_checkpoint(plan, 2)})
    emit({"kind": "eval", "step": 4, "loss": 0.7, "perplexity": 2.0, "metrics": {"accuracy": 0.5}})
    emit({"kind": "step", "phase": "export", "step": 4, "progress": 1.0})
    return write_result(plan, 4)


def test_a_job_runs_to_success_through_numbered_events(stack: Stack) -> None:
    service = stack.service(ThreadRunner(body=steady_body))
    job = service.submit(spec(aliases=("candidate",), tags={"team": "ml"}), request_id="r1", caller="alice")
    assert job.state is JobState.QUEUED and job.created_by == "alice"
    events = all_events(service, job.id)

    assert_well_formed(events)
    assert [e.kind for e in events] == [
        "queued",
        "started",
        *["step"] * 3,  # load, 1, 2
        "checkpoint",
        *["step"] * 2,  # 3, 4
        "eval",
        "step",  # export
        "step",  # register
        "finished",
    ]
    assert all(e.state is JobState.RUNNING for e in events[1:-1])
    started = events[1]
    assert (started.attempt, started.resumed_from_step) == (1, 0) and "pid" in started.worker
    train = [e for e in events if e.kind == "step" and e.phase == "train"]
    assert [(e.step, e.total_steps) for e in train] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [e.loss for e in train] == [2.0, 1.0, 2.0 / 3, 0.5] and train[-1].tokens_per_second == 504.0
    assert [e.phase for e in events if e.kind == "step"][-2:] == ["export", "register"]
    finished = events[-1]
    assert finished.state is JobState.SUCCEEDED and finished.progress == 1.0

    done = service.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.progress == 1.0 and done.finished_at
    assert (done.current_step, done.total_steps, done.checkpoint_step) == (4, 4, 2)
    assert done.latest_metrics["train_loss"] == 0.5 and done.latest_metrics["loss"] == 0.5
    assert done.latest_metrics["eval_accuracy"] == 0.5 and done.latest_metrics["eval_loss"] == 0.7
    assert done.result is not None and (done.result.name, done.result.version) == ("tiny-lora", 1)
    assert finished.result == done.result and finished.uri == done.output_uri == done.result.uri

    registered = stack.registry / "tiny-lora" / "1"
    assert (registered / "adapter_model.safetensors").read_bytes() == b"weights of " + job.id.encode()
    record = version_record(stack, "tiny-lora")
    assert (record["parent_name"], record["parent_version"]) == ("tiny", 1)
    assert record["adapter_base"] == ["tiny", 1] and record["format"] == "adapter"
    assert record["dataset"] == ["data/sft.jsonl", "", ""] and record["dataset_commit"] == ""
    assert (record["job_id"], record["job_kind"]) == (job.id, "training")
    assert record["tags"] == {"team": "ml", "training_method": "lora"}
    assert record["aliases"] == ["candidate"] and record["metrics"] == {"train_loss": 0.5}
    assert record["parameter_count"] == 1234 and "LORA" in record["description"]
    # scratch is freed once the result is registered; the dataset snapshot stays with the job
    job_dir = stack.root / "jobs" / job.id
    wait_until(lambda: not (job_dir / "checkpoints").exists() and not (job_dir / "output").exists())
    assert (job_dir / "dataset.jsonl").read_text().count("\n") == len(PC_ROWS)


def test_full_weights_register_without_an_adapter_base(stack: Stack) -> None:
    service = stack.service(ThreadRunner(body=steady_body))
    job = service.submit(spec("sft", output_model_name="tiny-full", description="all weights"))
    assert all_events(service, job.id)[-1].state is JobState.SUCCEEDED
    record = version_record(stack, "tiny-full")
    assert record["format"] == "fp32" and record["adapter_base"] is None
    assert (record["parent_name"], record["parent_version"], record["description"]) == (
        "tiny",
        1,
        "all weights",
    )
    assert (stack.registry / "tiny-full" / "1" / "model.safetensors").is_file()


def test_an_unregistered_result_stays_in_the_job_folder(stack: Stack) -> None:
    service = stack.service(ThreadRunner(body=steady_body))
    job = service.submit(spec(register=False))
    assert all_events(service, job.id)[-1].state is JobState.SUCCEEDED
    done = service.get(job.id)
    output = stack.root / "jobs" / job.id / "output"
    assert done.result is None and done.output_uri == output.resolve().as_uri()
    assert (output / "adapter_model.safetensors").is_file() and not stack.registry.exists()


def failing_body(
    plan: WorkerPlan, emit: Callable[[dict[str, Any]], None], stop: threading.Event
) -> dict[str, Any]:
    emit(step_event(1, 4))

    def tokenize() -> None:
        raise ValueError("row 3 has no tokens left\nafter truncation to 8")

    tokenize()
    raise AssertionError("unreachable")


def test_a_failing_worker_fails_the_job_with_one_line(stack: Stack) -> None:
    service = stack.service(ThreadRunner(body=failing_body))
    job = service.submit(spec())
    events = all_events(service, job.id)
    assert_well_formed(events)
    failed = service.get(job.id)
    assert failed.state is JobState.FAILED
    assert failed.error_message == "ValueError: row 3 has no tokens left"
    assert events[-1].kind == "failed" and events[-1].message == failed.error_message
    assert events[-1].step == 1
    logs = [e for e in events if e.kind == "log"]
    assert [(e.level, e.message) for e in logs] == [("error", failed.error_message)]
    assert not any("Traceback" in e.message or "\n" in e.message for e in events)
    assert not stack.registry.exists()
    with pytest.raises(FailedPrecondition, match="already failed"):
        service.cancel(job.id)


def test_a_cancelled_running_job_stops_at_the_workers_next_check(stack: Stack) -> None:
    saw_stop = threading.Event()

    def patient_body(
        plan: WorkerPlan, emit: Callable[[dict[str, Any]], None], stop: threading.Event
    ) -> dict[str, Any]:
        emit(step_event(1, 100))
        emit({"kind": "checkpoint", "step": 1, "uri": write_checkpoint(plan, 1)})
        if stop.wait(DEADLINE):
            saw_stop.set()
            raise Cancelled
        raise AssertionError("never asked to stop")

    service = stack.service(ThreadRunner(body=patient_body))
    job = service.submit(spec())
    wait_for_event(service, job.id, "checkpoint")
    asked = service.cancel(job.id, reason="wrong data", caller="alice")
    assert asked.cancel_requested and asked.state is JobState.RUNNING  # until the worker stops
    events = all_events(service, job.id)

    assert_well_formed(events)
    assert saw_stop.is_set()
    last = events[-1]
    assert (last.kind, last.state, last.message, last.cancelled_by) == (
        "cancelled",
        JobState.CANCELLED,
        "wrong data",
        "alice",
    )
    assert last.step == 1
    cancelled = service.get(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.cancelled_by == "alice"
    wait_until(lambda: not (stack.root / "jobs" / job.id / "checkpoints").exists())
    assert service.cancel(job.id, reason="again").cancel_reason == "wrong data"  # a no-op
    assert len(all_events(service, job.id)) == len(events)


def test_a_worker_that_ignores_cancel_is_killed_after_the_grace(stack: Stack) -> None:
    runner = FakeRunner(Script(last_step=1, total_steps=10, hold=threading.Event(), honours_cancel=False))
    service = stack.service(runner, cancel_grace_seconds=0.3)
    job = service.submit(spec())
    wait_for_event(service, job.id, "step")
    asked_at = time.monotonic()
    service.cancel(job.id, reason="stuck")
    events = all_events(service, job.id)
    took = time.monotonic() - asked_at

    assert events[-1].kind == "cancelled" and service.get(job.id).state is JobState.CANCELLED
    assert runner.attempts[0].calls == ["request_cancel", "kill"]
    assert 0.3 <= took < DEADLINE


def test_a_queued_job_is_cancelled_at_once_and_never_runs(stack: Stack) -> None:
    release = threading.Event()
    runner = FakeRunner(Script(hold=release))
    service = stack.service(runner, max_concurrent=1)
    first = service.submit(spec())
    wait_for_event(service, first.id, "started")
    second = service.submit(spec())
    assert service.events_since(second.id)[0].queue_position == 0  # the first one is running

    cancelled = service.cancel(second.id, reason="not needed", caller="bob")
    assert cancelled.state is JobState.CANCELLED and cancelled.cancel_requested
    assert [(e.kind, e.state) for e in service.events_since(second.id)] == [
        ("queued", JobState.QUEUED),
        ("cancelled", JobState.CANCELLED),
    ]
    release.set()
    assert all_events(service, first.id)[-1].state is JobState.SUCCEEDED
    assert [a.plan.job_id for a in runner.attempts] == [first.id]
    assert service.get(second.id).state is JobState.CANCELLED


def test_cancel_before_the_worker_starts_kills_the_attempt(stack: Stack) -> None:
    runner = FakeRunner(Script(hold=threading.Event(), never_starts=True))
    service = stack.service(runner)
    job = service.submit(spec())
    wait_until(lambda: service.attempt(job.id) is not None)
    assert service.get(job.id).state is JobState.QUEUED
    service.cancel(job.id)
    assert [e.kind for e in all_events(service, job.id)] == ["queued", "cancelled"]
    assert runner.attempts[0].calls == ["kill"]


def test_terminal_jobs_cannot_be_cancelled(stack: Stack) -> None:
    service = stack.service(FakeRunner())
    job = service.submit(spec())
    assert all_events(service, job.id)[-1].state is JobState.SUCCEEDED
    with pytest.raises(FailedPrecondition, match="already succeeded"):
        service.cancel(job.id)
    assert service.get(job.id).state is JobState.SUCCEEDED and not service.get(job.id).cancel_requested
    with pytest.raises(NotFound):
        service.cancel("tj-nope")


# lost workers -------------------------------------------------------------------------------------


def test_a_lost_worker_resumes_from_the_newest_complete_checkpoint(stack: Stack) -> None:
    def leave_an_unfinished_save(plan: WorkerPlan) -> None:
        write_checkpoint(plan, 6, complete=False)

    runner = FakeRunner(
        Script(
            last_step=6,
            total_steps=10,
            checkpoints=(2, 4),
            end="lost",
            reason="worker lost: node died",
            on_start=leave_an_unfinished_save,
        ),
        Script(first_step=5, last_step=10),
    )
    service = stack.service(runner)
    job = service.submit(spec())
    events = all_events(service, job.id)

    assert_well_formed(events)
    assert events[-1].kind == "finished" and service.get(job.id).attempt == 2
    first, second = runner.attempts
    assert first.plan.resume_from is None
    assert second.plan.resume_from is not None and Path(second.plan.resume_from).name == "checkpoint-4"
    assert Path(second.plan.resume_from) == Path(first.plan.checkpoint_dir) / "checkpoint-4"
    started = [(e.attempt, e.resumed_from_step) for e in events if e.kind == "started"]
    assert started == [(1, 0), (2, 4)]
    [warning] = [e for e in events if e.kind == "log"]
    assert warning.level == "warning" and "node died" in warning.message and "resum" in warning.message
    assert events.index(warning) < [e.kind for e in events].index("started", 2)
    steps = [e.step for e in events if e.kind == "step" and e.phase == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]


def test_the_job_fails_once_max_attempts_are_lost(stack: Stack) -> None:
    runner = FakeRunner(default=Script(last_step=2, checkpoints=(2,), end="lost", reason="worker lost: OOM"))
    service = stack.service(runner, max_attempts=2)
    job = service.submit(spec())
    events = all_events(service, job.id)

    assert_well_formed(events)
    failed = service.get(job.id)
    assert failed.state is JobState.FAILED and len(runner.attempts) == 2
    assert "OOM" in failed.error_message and "after 2 attempts" in failed.error_message
    assert events[-1].kind == "failed" and events[-1].message == failed.error_message
    assert [e.attempt for e in events if e.kind == "started"] == [1, 2]


def test_a_worker_lost_while_cancelling_ends_cancelled(stack: Stack) -> None:
    hold = threading.Event()
    runner = FakeRunner(Script(hold=hold, honours_cancel=False, end="lost", reason="worker lost"))
    service = stack.service(runner, cancel_grace_seconds=DEADLINE)
    job = service.submit(spec())
    wait_for_event(service, job.id, "started")
    service.cancel(job.id, reason="stop", caller="alice")
    wait_until(runner.attempts[0].cancel_requested.is_set)
    hold.set()  # the worker dies instead of stopping
    events = all_events(service, job.id)
    assert (events[-1].kind, events[-1].message) == ("cancelled", "stop")
    assert service.get(job.id).state is JobState.CANCELLED and len(runner.attempts) == 1


# admission ----------------------------------------------------------------------------------------


def test_a_full_queue_is_resource_exhausted_with_a_retry_delay(stack: Stack) -> None:
    release = threading.Event()
    service = stack.service(FakeRunner(Script(hold=release)), max_concurrent=1, max_queued=1)
    first = service.submit(spec())
    wait_for_event(service, first.id, "started")
    second = service.submit(spec())
    with pytest.raises(ResourceExhausted) as caught:
        service.submit(spec())
    assert caught.value.retry_after_seconds and caught.value.retry_after_seconds > 0
    assert [j.id for j in service.list_jobs()] == [second.id, first.id]
    release.set()
    assert all_events(service, second.id)[-1].state is JobState.SUCCEEDED
    third = service.submit(spec())  # room again
    assert all_events(service, third.id)[-1].state is JobState.SUCCEEDED


def test_a_request_id_is_idempotent_per_caller(stack: Stack) -> None:
    service = stack.service(FakeRunner())
    job = service.submit(spec(), request_id="r1", caller="alice")
    again = service.submit(spec(output_model_name="ignored"), request_id="r1", caller="alice")
    other = service.submit(spec(), request_id="r1", caller="bob")
    anonymous = [service.submit(spec()) for _ in range(2)]
    assert again.id == job.id and other.id != job.id
    assert len({j.id for j in service.list_jobs()}) == 2 + len(anonymous)
    with pytest.raises(InvalidArgument) as caught:
        service.submit(spec(), request_id="r" * 129)
    assert caught.value.field == "request_id"


@pytest.mark.parametrize(
    ("job_spec", "error", "match"),
    [
        (spec(path="data/missing.jsonl"), NotFound, "data/missing.jsonl"),
        (spec(path="../data/sft.jsonl"), InvalidArgument, "spec.dataset.ref.path"),
        (spec(path="data/bad.jsonl"), InvalidArgument, "line 2: 'completion' must be a string"),
        (dataclasses.replace(spec(), base_name="nope"), NotFound, "model nope"),
        (dataclasses.replace(spec(), base_version=7), NotFound, "no version 7"),
        (spec("qlora"), FailedPrecondition, "CUDA"),
        (spec("dpo"), InvalidArgument, "dpo trains on preference data"),
        (dataclasses.replace(spec(path="data/chat.jsonl"), base_name="plain"), FailedPrecondition, "chat"),
        (spec(hyperparameters=Hyperparameters(max_seq_length=256)), InvalidArgument, "context length 128"),
        (spec(num_workers=4), FailedPrecondition, "at most 1 worker"),
        (spec(num_workers=600), InvalidArgument, "spec.num_workers"),
    ],
)
def test_bad_submissions_are_refused_before_anything_is_queued(
    stack: Stack, job_spec: TrainingSpec, error: type[Exception], match: str
) -> None:
    runner = FakeRunner()
    service = stack.service(runner)
    with pytest.raises(error, match=match):
        service.submit(job_spec)
    assert service.list_jobs() == [] and runner.attempts == []
    assert list((stack.root / "jobs").iterdir()) == []


def test_the_base_is_resolved_and_the_format_recorded_at_submission(stack: Stack) -> None:
    service = stack.service(FakeRunner())
    job = service.submit(dataclasses.replace(spec(path="data/chat.jsonl"), base_version=None))
    assert (job.spec.base_name, job.spec.base_version, job.spec.data_format) == ("tiny", 1, "chat")
    assert job.plan is not None and job.plan.max_seq_length == 128
    assert all_events(service, job.id)[-1].state is JobState.SUCCEEDED


# reading jobs -------------------------------------------------------------------------------------


def test_list_jobs_filters_by_state_and_output_model_newest_first(stack: Stack) -> None:
    release = threading.Event()
    runner = FakeRunner(Script(), Script(end="failed", reason="ValueError: no"), Script(hold=release))
    service = stack.service(runner, max_concurrent=1)
    alpha = service.submit(spec(output_model_name="alpha"))
    assert all_events(service, alpha.id)[-1].state is JobState.SUCCEEDED
    default = service.submit(spec())
    assert all_events(service, default.id)[-1].state is JobState.FAILED
    running = service.submit(spec(output_model_name="alpha"))
    wait_for_event(service, running.id, "started")

    def ids(**filters: Any) -> list[str]:
        return [j.id for j in service.list_jobs(**filters)]

    assert ids() == [running.id, default.id, alpha.id]
    assert ids(states=frozenset({JobState.SUCCEEDED})) == [alpha.id]
    assert ids(states=frozenset({JobState.SUCCEEDED, JobState.FAILED})) == [default.id, alpha.id]
    assert ids(states=frozenset({JobState.RUNNING})) == [running.id]
    assert ids(states=frozenset({JobState.CANCELLED})) == []
    assert ids(output_model_name="alpha") == [running.id, alpha.id]
    assert ids(output_model_name="tiny-lora") == [default.id]
    assert ids(output_model_name="alpha", states=frozenset({JobState.SUCCEEDED})) == [alpha.id]
    release.set()


def test_watch_raises_timeout_when_nothing_happens(stack: Stack) -> None:
    release = threading.Event()
    service = stack.service(FakeRunner(Script(last_step=1, hold=release)))
    job = service.submit(spec())
    wait_for_event(service, job.id, "step")
    so_far = service.events_since(job.id)
    watching = service.watch(job.id, timeout=0.05)
    assert [next(watching) for _ in so_far] == so_far  # what happened is replayed first
    with pytest.raises(TimeoutError):
        next(watching)
    with pytest.raises(TimeoutError):
        list(service.watch(job.id, from_sequence=len(so_far) + 1, timeout=0.05))
    release.set()
    rest = list(service.watch(job.id, from_sequence=len(so_far) + 1, timeout=DEADLINE))
    assert rest[0].sequence == len(so_far) + 1 and rest[-1].kind == "finished"
    with pytest.raises(NotFound):
        service.get("tj-nope")


# restarts -----------------------------------------------------------------------------------------


def test_a_new_service_carries_on_from_the_job_folder(stack: Stack) -> None:
    runner = FakeRunner(
        Script(last_step=2), Script(last_step=3, total_steps=8, checkpoints=(3,), hold=threading.Event())
    )
    before = stack.service(runner, max_concurrent=1)
    done = before.submit(spec(output_model_name="done"), request_id="r1", caller="alice")
    done_events = all_events(before, done.id)
    left = before.submit(spec(output_model_name="left"))
    wait_for_event(before, left.id, "checkpoint")
    left_events = before.events_since(left.id)
    before.shutdown()
    assert runner.attempts[1].killed.is_set()
    assert before.get(left.id).state is JobState.RUNNING  # stopped, not cancelled

    again = FakeRunner(Script(first_step=4, last_step=8))
    after = stack.service(again, start=True)
    assert after.get(done.id).state is JobState.SUCCEEDED
    assert after.events_since(done.id) == done_events
    assert after.submit(spec(), request_id="r1", caller="alice").id == done.id
    resumed = all_events(after, left.id)

    assert_well_formed(resumed)
    assert resumed[: len(left_events)] == left_events
    note = resumed[len(left_events)]
    assert note.kind == "log" and note.level == "warning"
    assert "restarted" in note.message and "step 3" in note.message
    started = [(e.attempt, e.resumed_from_step) for e in resumed if e.kind == "started"]
    assert started == [(1, 0), (2, 3)]
    assert [a.plan.job_id for a in again.attempts] == [left.id]  # the finished job is not rerun
    assert again.attempts[0].plan.resume_from is not None
    assert Path(again.attempts[0].plan.resume_from).name == "checkpoint-3"
    assert after.get(left.id).state is JobState.SUCCEEDED
    assert [j.id for j in after.list_jobs()] == [left.id, done.id]
    assert version_record(stack, "left")["job_id"] == left.id


def test_a_queued_job_left_by_a_stopped_service_runs_on_the_next(stack: Stack) -> None:
    hold = threading.Event()
    before = stack.service(FakeRunner(Script(hold=hold)), max_concurrent=1)
    busy = before.submit(spec())
    wait_for_event(before, busy.id, "started")
    waiting = before.submit(spec())
    before.shutdown()

    after = stack.service(FakeRunner(), start=True, max_concurrent=2)
    events = all_events(after, waiting.id)
    assert_well_formed(events)
    assert [e.kind for e in events[:3]] == ["queued", "log", "started"]
    assert "queued again" in events[1].message and "resumes" not in events[1].message
    assert events[-1].kind == "finished"
    assert all_events(after, busy.id)[-1].kind == "finished"


# data-parallel jobs that outlive the service --------------------------------------------------------


@dataclasses.dataclass
class RemoteJob:
    """A job as a detached Ray Train coordinator holds it: its events and how it ends."""

    plan: WorkerPlan
    events: list[dict[str, Any]]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    killed: bool = False


class RemoteView(Attempt):
    """A service's view of a remote job, reading its events from a cursor."""

    detached = True

    def __init__(self, remote: RemoteJob, cursor: int) -> None:
        self.remote, self.cursor = remote, cursor

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], Outcome | None]:
        remote = self.remote
        if remote.killed:
            return [], Outcome("lost", reason="coordinator gone")
        finished = remote.done.is_set()
        new = remote.events[self.cursor :]
        self.cursor += len(new)
        if finished:
            return new, Outcome("succeeded", result=write_result(remote.plan, 4))
        if not new:
            remote.done.wait(timeout)
        return new, None

    def request_cancel(self) -> None:
        self.kill()

    def kill(self) -> None:
        self.remote.killed = True


class DetachedRunner(JobRunner):
    """Data-parallel jobs in a shared fake cluster that outlives any one service."""

    def __init__(self, cluster: dict[str, RemoteJob]) -> None:
        self.cluster = cluster
        self.started: list[str] = []
        self.reattached: list[tuple[str, int]] = []

    def max_workers(self) -> int:
        return 8

    def start(self, plan: WorkerPlan, resources: Resources) -> Attempt:
        first = [{"kind": "started", "worker": "rank 0 of 2"}, step_event(1, 4), step_event(2, 4)]
        self.cluster[plan.job_id] = remote = RemoteJob(plan, first)
        self.started.append(plan.job_id)
        return RemoteView(remote, 0)

    def reattach(self, job_id: str, cursor: int) -> Attempt | None:
        remote = self.cluster.get(job_id)
        if remote is None or remote.killed:
            return None
        self.reattached.append((job_id, cursor))
        return RemoteView(remote, cursor)

    def reconcile(self, running: set[str]) -> list[str]:
        stopped = [j for j, r in self.cluster.items() if j not in running and not r.killed]
        for job_id in stopped:
            self.cluster[job_id].killed = True
        return stopped


def test_a_data_parallel_job_outlives_the_service_and_the_next_one_follows_it(stack: Stack) -> None:
    cluster: dict[str, RemoteJob] = {}
    before = stack.service(DetachedRunner(cluster))
    job = before.submit(spec(num_workers=2))
    assert job.plan is not None and job.plan.num_workers == 2
    wait_until(lambda: before.get(job.id).current_step == 2)
    before.shutdown()
    remote = cluster[job.id]
    assert not remote.killed and before.get(job.id).state is JobState.RUNNING  # left running
    remote.events += [step_event(3, 4), step_event(4, 4)]  # it trained on while no service looked
    remote.done.set()
    orphan = cluster["tj-orphan"] = RemoteJob(remote.plan, [])

    runner = DetachedRunner(cluster)
    after = stack.service(runner, start=True)
    events = all_events(after, job.id)

    assert_well_formed(events)
    train_steps = [e.step for e in events if e.kind == "step" and e.phase == "train"]
    assert train_steps == [1, 2, 3, 4]  # no step lost or repeated
    assert [e.kind for e in events].count("started") == 1
    assert runner.started == [] and runner.reattached == [(job.id, 3)]  # followed, not run twice
    assert "follows the job" in next(e.message for e in events if e.kind == "log")
    assert events[-1].kind == "finished" and after.get(job.id).state is JobState.SUCCEEDED
    assert orphan.killed  # a coordinator the job book does not run is stopped


def test_a_data_parallel_job_whose_workers_are_gone_starts_again(stack: Stack) -> None:
    cluster: dict[str, RemoteJob] = {}
    before = stack.service(DetachedRunner(cluster))
    job = before.submit(spec(num_workers=2))
    wait_until(lambda: before.get(job.id).current_step == 2)
    before.shutdown()
    cluster[job.id].killed = True  # the cluster lost the job with the service (an embedded Ray)

    runner = DetachedRunner(cluster)
    after = stack.service(runner, start=True)
    wait_until(lambda: runner.started == [job.id])
    cluster[job.id].done.set()
    events = all_events(after, job.id)
    assert_well_formed(events)
    assert [(e.attempt, e.kind) for e in events if e.kind == "started"] == [(1, "started"), (2, "started")]
    assert events[-1].kind == "finished"
