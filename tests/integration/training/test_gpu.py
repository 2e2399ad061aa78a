"""QLoRA where it can run: on a CUDA GPU with bitsandbytes, a QLoRA job trains a LoRA adapter on a
4-bit NF4 base and registers the adapter (skipped on machines without a GPU; on a CPU the same spec
is refused with FAILED_PRECONDITION, which ``test_status_codes`` checks).

The job runs on the thread runner over local model folders, so the test needs neither Ray nor a
registry server: what it guards is the worker's QLoRA path (bitsandbytes 4-bit load, k-bit
preparation, mixed precision) and the result's shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmops.common.artifacts.sinks import LocalDirectorySink
from llmops.common.artifacts.sources import LocalModelSource
from llmops.common.datasets import DataRepository
from llmops.common.tiny_model import build_tiny_model
from llmops.training.domain import DatasetRef, Hyperparameters, JobState, LoraSpec, TrainingSpec
from llmops.training.runners.local import ThreadRunner
from llmops.training.service import Limits, TrainingService
from llmops.training.store import JobStore
from llmops.training.tracking import NullTracker
from tests.integration.training.conftest import sft_rows

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_qlora_trains_an_adapter_on_a_4bit_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    models = tmp_path / "models"
    shutil.copytree(build_tiny_model().path, models / "tiny" / "1")
    data = tmp_path / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(32)))
    service = TrainingService(
        source=LocalModelSource(models),
        sink=LocalDirectorySink(models),
        runner=ThreadRunner(),
        tracker=NullTracker(),
        repository=DataRepository(data),
        store=JobStore(tmp_path / "jobs"),
        limits=Limits(poll_seconds=0.1),
    )
    service.start()
    try:
        spec = TrainingSpec(
            base_name="tiny",
            dataset=DatasetRef("sft.jsonl"),
            method="qlora",
            lora=LoraSpec(r=8),
            hyperparameters=Hyperparameters(max_steps=6, per_device_batch_size=4, logging_every_steps=1),
        )
        job = service.submit(spec)
        assert job.plan is not None and job.plan.device == "cuda" and job.plan.precision in ("bf16", "fp16")
        found = list(service.watch(job.id, timeout=600))
    finally:
        service.shutdown()
    assert found[-1].state is JobState.SUCCEEDED, found[-1].message
    losses = [e.loss for e in found if e.kind == "step" and e.loss]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    registered = models / "tiny-qlora" / "1"
    assert (registered / "adapter_config.json").is_file()
    assert json.loads((registered / "version.json").read_text())["format"] == "adapter"
