"""The training API's proto conversion loses nothing a caller set and invents nothing they did not.

Invariants: a spec survives domain -> proto -> domain unchanged, including which branch of each
oneof was chosen and whether each optional field was set (seed, LoRA dropout, register), so "unset
means the default" still holds on the far side; enum values outside the API are INVALID_ARGUMENT
naming the field; each kind of job event fills its own payload with the fields it carries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from llmops.common.errors import InvalidArgument
from llmops.proto.common.v1 import compute_pb2, job_pb2
from llmops.proto.training.v1 import training_service_pb2 as pb
from llmops.training.convert import event_to_proto, job_to_proto, spec_from_proto, spec_to_proto
from llmops.training.domain import (
    DatasetRef,
    Hyperparameters,
    Job,
    JobEvent,
    JobState,
    LoraSpec,
    RegisteredResult,
    Resources,
    TrainingSpec,
)

FULL = TrainingSpec(
    base_name="tiny",
    base_version=3,
    dataset=DatasetRef(path="data/sft.jsonl", revision="v2", repo="https://git.example/data.git"),
    method="lora",
    data_format="chat",
    hyperparameters=Hyperparameters(
        max_steps=120,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-4,
        lr_scheduler="linear",
        warmup_steps=10,
        weight_decay=0.01,
        max_grad_norm=0.5,
        max_seq_length=512,
        precision="bf16",
        gradient_checkpointing=True,
        seed=7,
        eval_split=0.1,
        eval_every_steps=20,
        checkpoint_every_steps=40,
        logging_every_steps=5,
        dpo_beta=0.2,
    ),
    # 0.25 is exact in the proto's float32; 0.1 would come back as 0.10000000149
    lora=LoraSpec(r=16, alpha=8, dropout=0.25, target_modules=("q_proj", "v_proj"), merge_adapter=True),
    resources=Resources(cpus=4.0, gpus=1.0, memory_bytes=8 << 30, accelerator_type="H100"),
    num_workers=1,
    output_model_name="tiny-chat",
    register=False,
    aliases=("challenger", "canary"),
    tags={"team": "ml", "ticket": "ML-7"},
    description="a test run",
    mlflow_experiment="exp",
)


def _round_trip(spec: TrainingSpec) -> TrainingSpec:
    wire = pb.TrainingJobSpec.FromString(spec_to_proto(spec).SerializeToString())
    return spec_from_proto(wire)


def test_a_fully_populated_spec_survives_the_round_trip() -> None:
    assert _round_trip(FULL) == FULL


@pytest.mark.parametrize(
    "change",
    [
        # the other branch of each oneof, and the optionals unset
        {"base_version": None, "base_alias": "champion"},
        {"base_version": None},
        {
            "hyperparameters": Hyperparameters(
                num_epochs=2.5, warmup_ratio=0.05, lr_scheduler="constant", precision="fp16"
            )
        },
        {"hyperparameters": Hyperparameters(warmup_steps=0, seed=0, max_steps=1)},
        {"hyperparameters": Hyperparameters()},
        {"lora": LoraSpec(r=8)},
        {"lora": LoraSpec(dropout=0.0)},
        {"lora": None, "method": "sft", "data_format": None},
        {"method": "qlora"},
        {"method": "dpo", "data_format": "preference"},
        {"data_format": "text", "register": True, "aliases": (), "tags": {}},
        {"data_format": "prompt_completion"},
    ],
)
def test_every_variant_survives_the_round_trip(change: dict[str, Any]) -> None:
    spec = dataclasses.replace(FULL, **change)
    assert _round_trip(spec) == spec


def test_unset_optionals_stay_unset_on_the_wire() -> None:
    spec = dataclasses.replace(FULL, hyperparameters=Hyperparameters(), lora=LoraSpec())
    wire = spec_to_proto(spec)
    hp = wire.hyperparameters
    assert hp.WhichOneof("duration") is None and hp.WhichOneof("warmup") is None
    assert not hp.HasField("seed") and not wire.lora.HasField("dropout")
    assert wire.HasField("lora")


def test_a_message_that_sets_nothing_optional_means_the_defaults() -> None:
    message = pb.TrainingJobSpec(method=pb.TRAINING_METHOD_SFT)
    message.base_model.name = "tiny"
    spec = spec_from_proto(message)
    assert spec.register is True and spec.lora is None and spec.data_format is None
    assert spec.base_version is None and spec.base_alias is None
    assert spec.hyperparameters == Hyperparameters()


def _with(**changes: Any) -> pb.TrainingJobSpec:
    message = spec_to_proto(FULL)
    for path, value in changes.items():
        target: Any = message
        *parents, name = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    return message


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"method": 0}, "spec.method"),
        ({"method": 99}, "spec.method"),
        ({"dataset__format": 42}, "spec.dataset.format"),
        ({"hyperparameters__lr_scheduler": 9}, "spec.hyperparameters.lr_scheduler"),
        ({"hyperparameters__precision": 17}, "spec.hyperparameters.precision"),
    ],
)
def test_unknown_enum_values_are_refused_naming_the_field(changes: dict[str, int], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        spec_from_proto(_with(**changes))
    assert caught.value.field == field


def _event(kind: Any, state: JobState = JobState.RUNNING, **fields: Any) -> job_pb2.JobEvent:
    event = JobEvent(job_id="tj-1", sequence=5, time=1700000000.25, state=state, kind=kind, **fields)
    message = event_to_proto(event)
    assert (message.job_id, message.sequence, message.state) == ("tj-1", 5, job_pb2.JOB_STATE_RUNNING)
    assert abs(message.time.ToNanoseconds() - 1_700_000_000_250_000_000) < 1000  # float seconds
    assert message.WhichOneof("payload") == kind
    return message


def test_each_event_kind_fills_its_own_payload() -> None:
    assert _event("queued", queue_position=3).queued.queue_position == 3
    started = _event("started", worker="node-1 pid 7", attempt=2, resumed_from_step=4, mlflow_run_id="r1")
    assert (started.started.worker, started.started.attempt) == ("node-1 pid 7", 2)
    assert (started.started.resumed_from_step, started.started.mlflow_run_id) == (4, "r1")
    step = _event(
        "step",
        step=3,
        total_steps=10,
        loss=1.5,
        learning_rate=2e-4,
        tokens_per_second=900.0,
        progress=0.285,
        phase="train",
        epoch=0.3,
        metrics={"grad_norm": 0.7},
    ).step
    assert (step.step, step.total_steps, step.loss, step.learning_rate) == (3, 10, 1.5, 2e-4)
    assert (step.tokens_per_second, step.progress, step.phase, step.epoch) == (900.0, 0.285, "train", 0.3)
    assert dict(step.metrics) == {"grad_norm": 0.7}
    evaluation = _event("eval", step=4, loss=1.2, perplexity=3.3, metrics={"accuracy": 0.5}).eval
    assert (evaluation.step, evaluation.loss, evaluation.perplexity) == (4, 1.2, 3.3)
    assert dict(evaluation.metrics) == {"accuracy": 0.5}
    checkpoint = _event("checkpoint", step=4, uri="file:///jobs/tj-1/checkpoints/checkpoint-4").checkpoint
    assert (checkpoint.step, checkpoint.uri) == (4, "file:///jobs/tj-1/checkpoints/checkpoint-4")
    failed = _event("failed", message="ValueError: bad", step=6).failed
    assert (failed.reason, failed.step) == ("ValueError: bad", 6)
    cancelled = _event("cancelled", message="wrong data", cancelled_by="alice", step=2).cancelled
    assert (cancelled.reason, cancelled.cancelled_by, cancelled.step) == ("wrong data", "alice", 2)


def test_a_finished_event_carries_the_result_when_there_is_one() -> None:
    result = RegisteredResult(name="tiny-lora", version=2, uri="file:///models/tiny-lora/2")
    finished = _event("finished", uri=result.uri, metrics={"loss": 0.9}, result=result).finished
    assert (finished.output_uri, dict(finished.metrics)) == (result.uri, {"loss": 0.9})
    assert (finished.result.name, finished.result.version) == ("tiny-lora", 2)
    unregistered = _event("finished", uri="file:///jobs/tj-1/output").finished
    assert unregistered.output_uri == "file:///jobs/tj-1/output" and not unregistered.HasField("result")


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", job_pb2.LOG_LEVEL_DEBUG),
        ("info", job_pb2.LOG_LEVEL_INFO),
        ("warning", job_pb2.LOG_LEVEL_WARNING),
        ("error", job_pb2.LOG_LEVEL_ERROR),
        ("", job_pb2.LOG_LEVEL_INFO),
        ("loud", job_pb2.LOG_LEVEL_INFO),
    ],
)
def test_a_log_event_carries_its_level_and_line(level: str, expected: int) -> None:
    log = _event("log", level=level, message="the service restarted").log
    assert (log.level, log.message) == (expected, "the service restarted")


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (JobState.QUEUED, job_pb2.JOB_STATE_QUEUED),
        (JobState.RUNNING, job_pb2.JOB_STATE_RUNNING),
        (JobState.SUCCEEDED, job_pb2.JOB_STATE_SUCCEEDED),
        (JobState.FAILED, job_pb2.JOB_STATE_FAILED),
        (JobState.CANCELLED, job_pb2.JOB_STATE_CANCELLED),
    ],
)
def test_a_job_carries_its_state_times_and_result(state: JobState, expected: int) -> None:
    job = Job(
        id="tj-1",
        spec=FULL,
        created_at=100.5,
        created_by="alice",
        request_id="r1",
        state=state,
        started_at=101.0,
        progress=0.5,
        current_step=3,
        total_steps=6,
        latest_metrics={"loss": 1.0},
        checkpoint_step=2,
        result=RegisteredResult("tiny-chat", 4, "file:///m"),
        output_uri="file:///m",
        cancel_requested=True,
    )
    message = job_to_proto(job)
    assert message.state == expected and message.spec == spec_to_proto(FULL)
    assert message.created_at.ToNanoseconds() == 100_500_000_000 and not message.HasField("finished_at")
    assert (message.progress, message.current_step, message.total_steps) == (0.5, 3, 6)
    assert dict(message.latest_metrics) == {"loss": 1.0} and message.checkpoint_step == 2
    assert (message.result_version.name, message.result_version.version) == ("tiny-chat", 4)
    assert (message.created_by, message.request_id, message.cancel_requested) == ("alice", "r1", True)


def test_precision_and_scheduler_names_map_to_the_api_enums() -> None:
    wire = spec_to_proto(FULL).hyperparameters
    assert wire.precision == compute_pb2.PRECISION_BF16 and wire.lr_scheduler == pb.LR_SCHEDULER_LINEAR
