"""Each quantization job gets one MLflow run, created when the job starts: the run records the
method's settings and the evaluation settings as parameters and the data the job read as a dataset
input, receives the measurements and the result's files, and is closed FINISHED, FAILED or KILLED
before the job's terminal event. A store that cannot be reached when the job starts fails the job
with a one-line reason; trouble logging later only warns.

A recording tracker stands in for MLflow; a fake quantizer (it writes a small weights file and
evaluates as the tiny model itself) keeps each job to about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from llmops.common.artifacts.sinks import LocalDirectorySink
from llmops.common.errors import Unavailable
from llmops.common.jobs import JobState
from llmops.quantization.dispatch import Dispatcher
from llmops.quantization.domain import EvalSpec, JobSpec
from llmops.quantization.methods import QuantizationSpec
from llmops.quantization.methods.base import CalibrationSpec, ProgressFn, QuantizedArtifact, Quantizer
from llmops.quantization.service import QuantizationService
from llmops.quantization.tracking import RunStatus, Tracker, dataset_record, run_datasets, run_params


class ManualRunner(Dispatcher):
    """Runs submitted work when the test says so, in the test's thread."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def submit(self, work: Callable[[], None]) -> None:
        self.pending.append(work)

    def run_all(self) -> None:
        while self.pending:
            self.pending.pop(0)()


class FakeQuantizer(Quantizer):
    """Writes a small "weights" file; evaluates as the (unquantized) tiny model."""

    name = "fake"
    result_format = "int8"
    supported_bits = (8,)
    source_dir: Path | None = None
    fail = False
    on_quantize: Callable[[], None] = staticmethod(lambda: None)

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
        self.on_quantize()
        if progress is not None:
            progress(1.0)
        if self.fail:
            raise RuntimeError("the fake quantizer broke\nsecond line")
        self.source_dir = src_dir
        return self._finish(src_dir, out_dir, spec)

    def load_for_eval(self, out_dir: Path) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.source_dir).eval()


class RecordingTracker(Tracker):
    """Records every call; reports the job's state when the run is closed."""

    def __init__(self) -> None:
        self.service: QuantizationService | None = None
        self.calls: list[tuple[str, Any]] = []
        self.started: list[dict[str, Any]] = []
        self.failing: dict[str, Exception] = {}

    def _maybe_fail(self, call: str) -> None:
        if call in self.failing:
            raise self.failing[call]

    def start_run(self, job: Any) -> str:
        self.calls.append(("start_run", job.id))
        self._maybe_fail("start_run")
        self.started.append(
            {"job_id": job.id, "params": run_params(job.spec), "datasets": run_datasets(job.spec)}
        )
        return f"run-{job.id}"

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        self.calls.append(("log_metrics", (run_id, step, dict(metrics))))
        self._maybe_fail("log_metrics")

    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str) -> None:
        files = sorted(p.name for p in directory.iterdir())
        self.calls.append(("log_artifacts", (run_id, directory, artifact_path, files)))
        self._maybe_fail("log_artifacts")

    def end_run(self, run_id: str, status: RunStatus) -> None:
        assert self.service is not None
        job_id = run_id.removeprefix("run-")
        self.calls.append(("end_run", (run_id, status, self.service.get(job_id).state)))
        self._maybe_fail("end_run")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def call(self, name: str) -> Any:
        (found,) = [args for n, args in self.calls if n == name]
        return found


@pytest.fixture
def fake() -> FakeQuantizer:
    return FakeQuantizer()


@pytest.fixture
def tracker() -> RecordingTracker:
    return RecordingTracker()


def _service(tmp_path: Path, fake: FakeQuantizer, tracker: RecordingTracker) -> QuantizationService:
    service = QuantizationService(
        {fake.name: fake},
        LocalDirectorySink(tmp_path / "registry"),
        ManualRunner(),
        tmp_path / "work",
        tracker=tracker,
    )
    tracker.service = service
    return service


def _spec(src: Path, **kwargs: Any) -> JobSpec:
    return JobSpec(
        source_dir=src, source_name="tiny", source_version=3, quantization=QuantizationSpec("fake"), **kwargs
    )


def _run(service: QuantizationService) -> None:
    runner = service._dispatcher
    assert isinstance(runner, ManualRunner)
    runner.run_all()


def test_run_records_settings_data_measurements_and_files_then_finishes(
    tiny_model_dir: Path, tmp_path: Path, fake: FakeQuantizer, tracker: RecordingTracker
) -> None:
    text = tmp_path / "heldout.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    service = _service(tmp_path, fake, tracker)
    evaluation = EvalSpec(num_samples=2, seq_len=32, text_path=text)
    job = service.submit(_spec(tiny_model_dir, eval=evaluation, tags={"team": "search"}))
    _run(service)

    done = service.get(job.id)
    assert done.state is JobState.SUCCEEDED, done.error_message
    run_id = f"run-{job.id}"
    assert done.mlflow_run_id == run_id
    assert tracker.names() == ["start_run", "log_metrics", "log_artifacts", "end_run"]

    (started,) = tracker.started
    assert started["params"] == {
        "method": "fake",
        "bits": "8",
        "group_size": "0",
        "gguf_type": "",
        "device": "cpu",
        "eval.num_samples": "2",
        "eval.seq_len": "32",
        "eval.throughput_tokens": "0",
    }
    (dataset,) = started["datasets"]
    assert (dataset.source_type, dataset.context, dataset.name) == ("local", "evaluation", "heldout.txt")
    assert json.loads(dataset.source) == {"path": str(text)}
    assert dataset.digest == hashlib.sha256(text.read_bytes()).hexdigest()

    logged_run, step, metrics = tracker.call("log_metrics")
    assert (logged_run, step) == (run_id, 0)
    assert {
        "size_bytes_before",
        "size_bytes_after",
        "size_ratio",
        "perplexity_before",
        "perplexity_after",
    } <= set(metrics)
    assert "tokens_per_second_after" not in metrics  # not measured, not logged
    assert metrics["size_bytes_after"] == 1000
    artifact_run, directory, artifact_path, files = tracker.call("log_artifacts")
    assert (artifact_run, directory, artifact_path) == (run_id, tmp_path / "work" / job.id, "model")
    assert "model.safetensors" in files
    # closed FINISHED while the job was still running: watchers of the terminal event find it closed
    assert tracker.call("end_run") == (run_id, "FINISHED", JobState.RUNNING)

    events = list(service.watch(job.id))
    started_event = next(e for e in events if e.kind == "started")
    assert started_event.mlflow_run_id == run_id
    record = json.loads((tmp_path / "registry" / "tiny-fake" / "1" / "version.json").read_text())
    assert record["mlflow_run_id"] == run_id and record["job_id"] == job.id


def test_failing_job_closes_its_run_failed(
    tiny_model_dir: Path, tmp_path: Path, fake: FakeQuantizer, tracker: RecordingTracker
) -> None:
    fake.fail = True
    service = _service(tmp_path, fake, tracker)
    job = service.submit(_spec(tiny_model_dir))
    _run(service)
    failed = service.get(job.id)
    assert failed.state is JobState.FAILED and "broke" in failed.error_message
    assert tracker.names() == ["start_run", "end_run"]
    assert tracker.call("end_run") == (f"run-{job.id}", "FAILED", JobState.RUNNING)


def test_cancelled_job_closes_its_run_killed(
    tiny_model_dir: Path, tmp_path: Path, fake: FakeQuantizer, tracker: RecordingTracker
) -> None:
    service = _service(tmp_path, fake, tracker)
    job = service.submit(_spec(tiny_model_dir))

    def cancel_own_job() -> None:
        service.cancel(job.id, reason="enough")

    fake.on_quantize = cancel_own_job
    _run(service)
    assert service.get(job.id).state is JobState.CANCELLED
    assert tracker.names() == ["start_run", "end_run"]
    assert tracker.call("end_run") == (f"run-{job.id}", "KILLED", JobState.RUNNING)


def test_job_cancelled_while_queued_gets_no_run(
    tiny_model_dir: Path, tmp_path: Path, fake: FakeQuantizer, tracker: RecordingTracker
) -> None:
    service = _service(tmp_path, fake, tracker)
    job = service.submit(_spec(tiny_model_dir))
    service.cancel(job.id)
    _run(service)
    assert service.get(job.id).mlflow_run_id == "" and tracker.calls == []


def test_unreachable_store_at_start_fails_the_job_with_one_line(
    tiny_model_dir: Path, tmp_path: Path, fake: FakeQuantizer, tracker: RecordingTracker
) -> None:
    tracker.failing["start_run"] = Unavailable("MLflow tracking store unreachable: connection refused")
    called: list[bool] = []

    def record_call() -> None:
        called.append(True)

    fake.on_quantize = record_call
    service = _service(tmp_path, fake, tracker)
    job = service.submit(_spec(tiny_model_dir))
    _run(service)
    failed = service.get(job.id)
    assert failed.state is JobState.FAILED
    assert failed.error_message == "MLflow tracking store unreachable: connection refused"
    assert failed.mlflow_run_id == "" and not called  # nothing ran, nothing to close
    assert [e.kind for e in service.watch(job.id)] == ["queued", "failed"]
    assert tracker.names() == ["start_run"]
    assert not (tmp_path / "registry").exists()


@pytest.mark.parametrize("broken", ["log_metrics", "log_artifacts", "end_run"])
def test_logging_trouble_after_the_start_only_warns(
    broken: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    fake: FakeQuantizer,
    tracker: RecordingTracker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker.failing[broken] = ConnectionError("store went away")
    service = _service(tmp_path, fake, tracker)
    job = service.submit(_spec(tiny_model_dir))
    with caplog.at_level(logging.WARNING, logger="llmops.quantization.service"):
        _run(service)
    done = service.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result is not None
    assert done.result.registered is not None
    assert any("store went away" in r.getMessage() and job.id in r.getMessage() for r in caplog.records)


def test_dataset_records() -> None:
    assert run_datasets(_spec(Path("src"))) == []  # perplexity not measured: no data read
    (default,) = run_datasets(_spec(Path("src"), eval=EvalSpec(num_samples=4)))
    assert (default.name, default.source_type, default.context) == ("stdlib-heldout", "local", "evaluation")
    assert default.digest == run_datasets(_spec(Path("src"), eval=EvalSpec(num_samples=8)))[0].digest
    dvc = dataset_record(Path("data/calib.jsonl"), "calibration", revision="v1", commit="abc123")
    assert (dvc.source_type, dvc.digest, dvc.name) == ("dvc", "abc123", "calib.jsonl")
    assert json.loads(dvc.source) == {
        "path": "data/calib.jsonl",
        "revision": "v1",
        "commit": "abc123",
        "repo": "",
    }


def test_calibration_data_is_an_input_of_calibrated_jobs(tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text\n")
    calibration = CalibrationSpec(
        num_samples=16, seq_len=128, text_path=text, dataset=("data/calib.txt", "v2", "git@example:data")
    )
    spec = JobSpec(
        source_dir=Path("src"),
        source_name="tiny",
        quantization=QuantizationSpec("gptq", bits=4, group_size=128, calibration=calibration),
        eval=EvalSpec(num_samples=4, text_path=text),
    )
    calibrated, evaluated = run_datasets(spec)
    assert (calibrated.context, calibrated.source_type, evaluated.context) == (
        "calibration",
        "dvc",
        "evaluation",
    )
    assert json.loads(calibrated.source) == {
        "path": "data/calib.txt",
        "revision": "v2",
        "commit": "",
        "repo": "git@example:data",
    }
    assert calibrated.digest == evaluated.digest == hashlib.sha256(text.read_bytes()).hexdigest()
    params = run_params(spec)
    assert (params["calibration.num_samples"], params["calibration.seq_len"]) == ("16", "128")
    assert not any("text_path" in k or "dataset" in k for k in params)  # no local paths


def test_folder_digest_follows_its_text_files(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    first = dataset_record(tmp_path, "evaluation")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    assert dataset_record(tmp_path, "evaluation").digest == first.digest
    (tmp_path / "a.py").write_text("x = 2\n")
    assert dataset_record(tmp_path, "evaluation").digest != first.digest
