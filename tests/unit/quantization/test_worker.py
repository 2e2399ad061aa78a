"""The quantization job body and its supervision by the service.

Invariants: a plan survives the trip into a worker as JSON (every field, calibration included);
the body reports its phases with rising progress (the quantizer's own progress as ``quantize``
steps), returns the measurements and the result folder, and raises ``Cancelled`` at its next check
once ``stop`` is set (between phases and at a progress report); the service turns the worker's
events into numbered job events, fails a job whose worker was lost with that reason (no retry),
kills a worker that ignores a cancel after the grace, and kills a worker still waiting to start at
once.

The body runs on the real tiny model with a fake quantizer (no quantization kernels); the
supervision tests use a scripted runner, so no test here starts Ray.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from llmops.common.artifacts.sinks import LocalDirectorySink
from llmops.common.jobs import JobState
from llmops.common.runners import Attempt, Cancelled, JobRunner, Outcome, Resources
from llmops.quantization import worker
from llmops.quantization.dispatch import Dispatcher
from llmops.quantization.domain import EvalSpec, JobSpec, Limits
from llmops.quantization.methods import CalibrationSpec, QuantizationSpec
from llmops.quantization.methods.base import ProgressFn, QuantizedArtifact, Quantizer
from llmops.quantization.service import QuantizationService


class FakeQuantizer(Quantizer):
    """Writes a small weights file, reporting progress in quarters; evaluates as the source."""

    name = "fake"
    result_format = "int8"
    supported_bits = (8,)

    def __init__(self, on_progress: Any = None) -> None:
        self.on_progress = on_progress or (lambda fraction: None)
        self.source: Path | None = None

    def quantize(
        self,
        src_dir: Path,
        out_dir: Path,
        spec: QuantizationSpec,
        calibration: Sequence[torch.Tensor] | None = None,
        progress: ProgressFn | None = None,
    ) -> QuantizedArtifact:
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"w" * 1000)
        self.source = src_dir
        for fraction in (0.25, 0.5, 0.75, 1.0):
            self.on_progress(fraction)
            if progress is not None:
                progress(fraction)
        return self._finish(src_dir, out_dir, spec)

    def load_for_eval(self, out_dir: Path) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.source).eval()


def _plan(source: Path, out_dir: Path, **fields: Any) -> worker.Plan:
    return worker.Plan(
        job_id="qj-1", source_dir=source, out_dir=out_dir, quantization=QuantizationSpec("fake"), **fields
    )


def test_a_plan_crosses_to_the_worker_as_json(tmp_path: Path) -> None:
    calibration = CalibrationSpec(
        num_samples=4, seq_len=64, text_path=tmp_path / "c.jsonl", dataset=("data/c.jsonl", "v1", "repo")
    )
    plan = worker.Plan(
        job_id="qj-7",
        source_dir=tmp_path / "src",
        out_dir=tmp_path / "out",
        quantization=QuantizationSpec("gptq", bits=4, group_size=128, calibration=calibration),
        eval_samples=2,
        eval_seq_len=32,
        eval_text_path=tmp_path / "heldout.txt",
        throughput_tokens=8,
    )
    assert worker.Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    bare = _plan(tmp_path / "src", tmp_path / "out")
    assert worker.Plan.from_dict(json.loads(json.dumps(bare.to_dict()))) == bare


def test_the_body_reports_its_phases_and_returns_the_measurements(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    events: list[dict[str, Any]] = []
    plan = _plan(tiny_model_dir, tmp_path / "out", eval_samples=2, eval_seq_len=32)
    result = worker.run(
        plan.to_dict(), events.append, threading.Event(), quantizers={"fake": FakeQuantizer()}
    )

    steps = [(e["phase"], e["progress"]) for e in events]
    assert [phase for phase, _ in steps] == ["evaluate", *["quantize"] * 5, "evaluate"]
    assert [p for _, p in steps] == sorted(p for _, p in steps)
    assert steps[1:6] == [("quantize", 0.3), *[("quantize", 0.3 + 0.4 * f) for f in (0.25, 0.5, 0.75, 1.0)]]
    assert result["output_dir"] == str(tmp_path / "out") and result["format"] == "int8"
    assert result["size_bytes_after"] == 1000 and result["size_bytes_before"] > 1000
    assert result["perplexity_before"] == pytest.approx(result["perplexity_after"])  # the fake is the source
    assert result["tokens_per_second_before"] is None and result["tokens_per_second_after"] is None
    json.dumps(result)  # crosses back from the worker as is


def test_the_body_stops_at_its_next_progress_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    fractions: list[float] = []

    def halfway(fraction: float) -> None:
        fractions.append(fraction)
        if fraction == 0.5:
            stop.set()

    events: list[dict[str, Any]] = []
    quantizers = {"fake": FakeQuantizer(on_progress=halfway)}
    with pytest.raises(Cancelled):
        worker.run(_plan(tiny_model_dir, tmp_path / "out").to_dict(), events.append, stop, quantizers)
    assert fractions == [0.25, 0.5]  # it did not go on to 0.75
    assert events[-1] == {"kind": "step", "phase": "quantize", "progress": 0.3 + 0.4 * 0.25}


def test_the_body_stops_before_its_first_phase(tiny_model_dir: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    events: list[dict[str, Any]] = []
    with pytest.raises(Cancelled):
        worker.run(
            _plan(tiny_model_dir, tmp_path / "out").to_dict(), events.append, stop, {"fake": FakeQuantizer()}
        )
    assert events == [] and not (tmp_path / "out").exists()


# supervision ---------------------------------------------------------------------------------------


class ScriptedAttempt(Attempt):
    """Reports ``started`` and one step, then ends as ``end`` once ``release`` is set (or never)."""

    def __init__(self, end: Outcome | None, starts: bool = True, honours_cancel: bool = True) -> None:
        self.end = end
        self.honours_cancel = honours_cancel
        self.release = threading.Event()
        self.calls: list[str] = []
        self._pending: list[dict[str, Any]] = (
            [
                {"kind": "started", "worker": "node-7 pid 4242"},
                {"kind": "step", "phase": "quantize", "progress": 0.5},
            ]
            if starts
            else []
        )

    def poll(self, timeout: float) -> tuple[list[dict[str, Any]], Outcome | None]:
        events, self._pending = self._pending, []
        if "kill" in self.calls:
            return events, Outcome("cancelled")
        if self.honours_cancel and "request_cancel" in self.calls:
            return events, Outcome("cancelled")
        if not self.release.wait(timeout) or self.end is None:
            return events, None
        return events, self.end

    def request_cancel(self) -> None:
        self.calls.append("request_cancel")

    def kill(self) -> None:
        self.calls.append("kill")


class ScriptedRunner(JobRunner):
    def __init__(self, attempt: ScriptedAttempt) -> None:
        self.attempt = attempt
        self.started: list[tuple[str, Mapping[str, Any], Resources]] = []

    def start(self, job_id: str, plan: Mapping[str, Any], resources: Resources) -> Attempt:
        self.started.append((job_id, plan, resources))
        return self.attempt


class InlineDispatcher(Dispatcher):
    """Runs each supervisor on its own thread at once (so a test can cancel while it runs)."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def submit(self, work: Any) -> None:
        thread = threading.Thread(target=work, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=10)
            assert not thread.is_alive()


def _service(tmp_path: Path, runner: JobRunner, dispatcher: Dispatcher) -> QuantizationService:
    return QuantizationService(
        {"fake": FakeQuantizer()},
        LocalDirectorySink(tmp_path / "registry"),
        dispatcher,
        tmp_path / "work",
        runner=runner,
        limits=Limits(cancel_grace_seconds=0.2, poll_seconds=0.01),
    )


def _spec(source: Path, **fields: Any) -> JobSpec:
    return JobSpec(source_dir=source, source_name="tiny", quantization=QuantizationSpec("fake"), **fields)


def test_a_lost_worker_fails_the_job_with_the_reason(tiny_model_dir: Path, tmp_path: Path) -> None:
    attempt = ScriptedAttempt(Outcome("lost", reason="worker lost: the actor died (OOM)"))
    attempt.release.set()
    runner, dispatcher = ScriptedRunner(attempt), InlineDispatcher()
    service = _service(tmp_path, runner, dispatcher)
    job = service.submit(_spec(tiny_model_dir, eval=EvalSpec(num_samples=2), resources=Resources(cpus=3)))
    events = list(service.watch(job.id, timeout=10))
    dispatcher.join()

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.kind for e in events] == ["queued", "started", "step", "failed"]
    assert events[1].worker == "node-7 pid 4242" and events[2].phase == "quantize"
    failed = service.get(job.id)
    assert failed.state is JobState.FAILED
    assert failed.error_message.startswith("worker lost: the actor died (OOM)")
    assert "not retried" in failed.error_message and events[-1].message == failed.error_message
    ((job_id, plan, resources),) = runner.started  # one attempt only
    assert job_id == job.id and resources == Resources(cpus=3)
    assert worker.Plan.from_dict(plan).eval_samples == 2


def test_a_worker_that_ignores_a_cancel_is_killed_after_the_grace(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    attempt = ScriptedAttempt(end=None, honours_cancel=False)
    dispatcher = InlineDispatcher()
    service = _service(tmp_path, ScriptedRunner(attempt), dispatcher)
    job = service.submit(_spec(tiny_model_dir))
    next(e for e in service.watch(job.id, timeout=10) if e.kind == "step")
    asked = service.cancel(job.id, reason="enough")
    assert asked.state is JobState.RUNNING and asked.cancel_requested
    last = list(service.watch(job.id, timeout=10))[-1]
    dispatcher.join()
    assert (last.kind, last.state, last.message) == ("cancelled", JobState.CANCELLED, "enough")
    assert attempt.calls[0] == "request_cancel" and attempt.calls[-1] == "kill"


def test_a_worker_not_yet_started_is_killed_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    attempt = ScriptedAttempt(end=None, starts=False, honours_cancel=False)
    dispatcher = InlineDispatcher()
    service = _service(tmp_path, ScriptedRunner(attempt), dispatcher)
    job = service.submit(_spec(tiny_model_dir))
    while service.attempt(job.id) is None:
        threading.Event().wait(0.005)
    service.cancel(job.id)
    assert list(service.watch(job.id, timeout=10))[-1].state is JobState.CANCELLED
    dispatcher.join()
    assert "kill" in attempt.calls
