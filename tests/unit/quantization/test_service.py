"""The job core: a submitted job runs to a terminal state through ordered events with
non-decreasing progress, registers its result as a child version carrying lineage and the measured
numbers, deduplicates by request_id, is cancellable while queued or running, bounds its queue, and
rejects bad input before queueing (INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from llmops.common.artifacts.sinks import LocalDirectorySink
from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from llmops.common.jobs import JobState
from llmops.quantization.dispatch import Dispatcher, ThreadDispatcher
from llmops.quantization.domain import EvalSpec, JobSpec
from llmops.quantization.methods import QuantizationSpec, default_quantizers
from llmops.quantization.methods.base import ProgressFn, QuantizedArtifact, Quantizer
from llmops.quantization.service import QuantizationService


class ManualRunner(Dispatcher):
    """Holds work until the test runs it, so tests control when a job starts."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def submit(self, work: Callable[[], None]) -> None:
        self.pending.append(work)

    def run_all(self) -> None:
        while self.pending:
            self.pending.pop(0)()


class CancellingQuantizer(Quantizer):
    """A fake that asks its own job to cancel mid-way, then reports progress."""

    name = "fake_cancel"
    result_format = "int8"
    supported_bits = (8,)
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
        self.on_quantize()
        assert progress is not None
        progress(0.5)
        raise AssertionError("the job should have stopped at the progress call")

    def load_for_eval(self, out_dir: Path) -> Any:
        raise NotImplementedError


def _spec(src: Path, method: str = "int8_dynamic", **kwargs: Any) -> JobSpec:
    return JobSpec(
        source_dir=src, source_name="tiny", source_version=3, quantization=QuantizationSpec(method), **kwargs
    )


def _service(tmp_path: Path, runner: Dispatcher, **kwargs: Any) -> QuantizationService:
    return QuantizationService(
        kwargs.pop("quantizers", default_quantizers()),
        LocalDirectorySink(tmp_path / "registry"),
        runner,
        tmp_path / "work",
        **kwargs,
    )


def test_job_runs_to_success_and_registers_a_child_version(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = ThreadDispatcher()
    service = _service(tmp_path, runner)
    evaluation = EvalSpec(num_samples=2, seq_len=64, throughput_tokens=8)
    job = service.submit(_spec(tiny_model_dir, eval=evaluation, aliases=("candidate",)), request_id="r1")
    assert job.state is JobState.QUEUED
    assert service.submit(_spec(tiny_model_dir), request_id="r1").id == job.id  # idempotent
    events = list(service.watch(job.id, timeout=120))
    runner.shutdown()

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.kind for e in events][:2] == ["queued", "started"] and events[-1].kind == "finished"
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and events[-1].progress == 1.0
    assert {"quantize", "evaluate", "register"} <= {e.phase for e in events}

    done = service.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result is not None
    result = done.result
    assert result.size_ratio < 0.4
    assert result.perplexity_before and result.perplexity_after
    assert (
        math.isfinite(result.perplexity_after)
        and abs(result.perplexity_after / result.perplexity_before - 1) < 0.05
    )
    assert result.tokens_per_second_before and result.tokens_per_second_after
    assert result.registered is not None and result.registered.version == 1
    record = json.loads((tmp_path / "registry" / "tiny-int8-dynamic" / "1" / "version.json").read_text())
    assert (record["parent_name"], record["parent_version"]) == ("tiny", 3)
    assert record["tags"]["quantization_method"] == "int8_dynamic"
    assert record["metrics"]["size_ratio"] == pytest.approx(result.size_ratio)
    assert record["aliases"] == ["candidate"]
    # a watch resumed from the middle replays only the rest
    assert [e.sequence for e in service.watch(job.id, from_sequence=3)] == [e.sequence for e in events[2:]]
    with pytest.raises(FailedPrecondition):
        service.cancel(job.id)


def test_cancelled_queued_job_never_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = ManualRunner()
    service = _service(tmp_path, runner)
    job = service.submit(_spec(tiny_model_dir))
    cancelled = service.cancel(job.id, reason="changed my mind")
    assert cancelled.state is JobState.CANCELLED and cancelled.cancel_requested
    runner.run_all()
    assert [e.kind for e in service.watch(job.id)] == ["queued", "cancelled"]
    assert service.cancel(job.id).state is JobState.CANCELLED  # no-op
    assert not (tmp_path / "registry").exists()


def test_running_job_stops_at_its_next_progress_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = ManualRunner()
    fake = CancellingQuantizer()
    service = _service(tmp_path, runner, quantizers={fake.name: fake})
    job = service.submit(_spec(tiny_model_dir, method=fake.name))

    def cancel_own_job() -> None:
        service.cancel(job.id)

    fake.on_quantize = cancel_own_job
    runner.run_all()
    assert service.get(job.id).state is JobState.CANCELLED
    assert not (tmp_path / "work" / job.id).exists()


def test_failed_job_reports_one_line_and_server_state_stays_usable(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    runner = ManualRunner()
    fake = CancellingQuantizer()  # without a cancel it reaches its AssertionError
    service = _service(tmp_path, runner, quantizers={fake.name: fake})
    job = service.submit(_spec(tiny_model_dir, method=fake.name))
    runner.run_all()
    failed = service.get(job.id)
    assert failed.state is JobState.FAILED and "AssertionError" in failed.error_message
    assert "\n" not in failed.error_message
    assert [j.id for j in service.list_jobs(frozenset({JobState.FAILED}))] == [job.id]


def test_queue_is_bounded(tiny_model_dir: Path, tmp_path: Path) -> None:
    service = _service(tmp_path, ManualRunner(), max_pending=1)
    service.submit(_spec(tiny_model_dir))
    with pytest.raises(ResourceExhausted):
        service.submit(_spec(tiny_model_dir))


def test_bad_input_is_rejected_before_queueing(tiny_model_dir: Path, tmp_path: Path) -> None:
    service = _service(tmp_path, ManualRunner())
    with pytest.raises(InvalidArgument):
        service.submit(_spec(tiny_model_dir, method="gptq"))
    with pytest.raises(NotFound):
        service.submit(_spec(tmp_path / "missing"))
    with pytest.raises(NotFound):
        service.get("qj-none")
    quantized = tmp_path / "already"
    quantized.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (quantized / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "torchao"}})
    )
    with pytest.raises(FailedPrecondition, match="already quantized"):
        service.submit(_spec(quantized))
    assert service.list_jobs() == []
