"""Typed domain objects of the training service: what a job asks for, what it is, what it emits.

``TrainingSpec`` mirrors the gRPC ``TrainingJobSpec`` with zero meaning "the default"; validation
turns it into a :class:`WorkerPlan` where every default is resolved to a number, which is what a
worker trains from. Everything here is plain data (JSON-serializable through ``to_dict`` /
``from_dict``) so a job survives a service restart and a plan crosses into a Ray worker process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from llmops.common.datasets import DatasetRef as DatasetRef  # re-exported: a job's data reference
from llmops.common.jobs import JobState as JobState  # re-exported: part of the domain's vocabulary
from llmops.common.runners.base import Resources as Resources  # re-exported, as JobState

Method = Literal["sft", "lora", "qlora", "dpo"]
DataFormat = Literal["text", "prompt_completion", "chat", "preference"]
Scheduler = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
EventKind = Literal[
    "queued", "started", "step", "eval", "checkpoint", "finished", "failed", "cancelled", "log"
]

METHODS: tuple[Method, ...] = ("sft", "lora", "qlora", "dpo")
DATA_FORMATS: tuple[DataFormat, ...] = ("text", "prompt_completion", "chat", "preference")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """As submitted: zero (or ``None``) means the documented default."""

    num_epochs: float | None = None
    max_steps: int | None = None
    per_device_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    learning_rate: float = 0.0
    lr_scheduler: Scheduler = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    max_seq_length: int = 0
    precision: Precision | None = None
    gradient_checkpointing: bool = False
    seed: int | None = None
    eval_split: float = 0.0
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 0
    logging_every_steps: int = 0
    dpo_beta: float = 0.0


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    r: int = 0
    alpha: int = 0
    dropout: float | None = None
    target_modules: tuple[str, ...] = ()
    merge_adapter: bool = False


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """A job as submitted, with the base model resolved to a version once it is accepted."""

    base_name: str
    dataset: DatasetRef
    method: Method
    base_version: int | None = None
    base_alias: str | None = None
    data_format: DataFormat | None = None
    hyperparameters: Hyperparameters = Hyperparameters()
    lora: LoraSpec | None = None
    resources: Resources = Resources()
    num_workers: int = 0
    output_model_name: str = ""
    register: bool = True
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""
    mlflow_experiment: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingSpec:
        fields = dict(data)
        fields["dataset"] = DatasetRef(**fields["dataset"])
        fields["hyperparameters"] = Hyperparameters(**fields["hyperparameters"])
        fields["lora"] = (
            LoraSpec(**{**fields["lora"], "target_modules": tuple(fields["lora"]["target_modules"])})
            if fields.get("lora")
            else None
        )
        fields["resources"] = Resources(**fields["resources"])
        fields["aliases"] = tuple(fields.get("aliases", ()))
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    r: int
    alpha: int
    dropout: float
    #: Module names, or ``("all-linear",)`` for every linear layer except the output head.
    target_modules: tuple[str, ...]
    merge_adapter: bool


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs to train, every default resolved; crosses into the worker process.

    ``max_steps`` > 0 overrides ``num_epochs``. Paths are local to the worker (a shared volume on a
    cluster): the base model folder, the job's dataset snapshot, and where checkpoints and the
    result go.
    """

    job_id: str
    method: Method
    data_format: DataFormat
    base_dir: str
    dataset_file: str
    checkpoint_dir: str
    output_dir: str
    num_epochs: float
    max_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler: Scheduler
    warmup_steps: int
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    max_seq_length: int
    precision: Precision
    gradient_checkpointing: bool
    seed: int
    eval_split: float
    eval_every_steps: int
    checkpoint_every_steps: int
    logging_every_steps: int
    dpo_beta: float
    device: Literal["cpu", "cuda"]
    lora: LoraPlan | None = None
    #: Checkpoint folder to resume from; ``None`` starts fresh.
    resume_from: str | None = None
    #: Data-parallel workers (Ray Train DDP ranks); 1 runs the job in one worker process.
    num_workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerPlan:
        fields = dict(data)
        if fields.get("lora"):
            lora = dict(fields["lora"])
            fields["lora"] = LoraPlan(**{**lora, "target_modules": tuple(lora["target_modules"])})
        return cls(**fields)

    @property
    def trains_adapter(self) -> bool:
        return self.lora is not None

    @property
    def registers_adapter(self) -> bool:
        """The result is a PEFT adapter (not merged into full weights)."""
        return self.lora is not None and not self.lora.merge_adapter


@dataclasses.dataclass(frozen=True)
class RegisteredResult:
    name: str
    version: int
    uri: str


@dataclasses.dataclass(frozen=True)
class JobEvent:
    """One thing that happened to a job; only the fields of its ``kind`` are meaningful."""

    job_id: str
    sequence: int
    time: float
    state: JobState
    kind: EventKind
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    progress: float = 0.0
    phase: str = ""
    epoch: float = 0.0
    perplexity: float = 0.0
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: checkpoint: where it was written; finished: where the result's files are.
    uri: str = ""
    #: started: where the job runs, which attempt, and the checkpoint step it resumed from.
    worker: str = ""
    attempt: int = 0
    resumed_from_step: int = 0
    mlflow_run_id: str = ""
    queue_position: int = 0
    #: failed: the reason; cancelled: the reason given; log: the line.
    message: str = ""
    level: str = ""
    cancelled_by: str = ""
    result: RegisteredResult | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return {
            k: v for k, v in data.items() if v not in (0, 0.0, "", None, {}) or k in ("sequence", "state")
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobEvent:
        fields = dict(data)
        fields["state"] = JobState(fields["state"])
        if fields.get("result"):
            fields["result"] = RegisteredResult(**fields["result"])
        return cls(**fields)


@dataclasses.dataclass
class Job:
    """A job's mutable record; the service hands out copies."""

    id: str
    spec: TrainingSpec
    created_at: float
    created_by: str = ""
    request_id: str = ""
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    current_step: int = 0
    total_steps: int = 0
    latest_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    mlflow_run_id: str = ""
    checkpoint_step: int = 0
    checkpoint_uri: str = ""
    result: RegisteredResult | None = None
    output_uri: str = ""
    error_message: str = ""
    cancel_requested: bool = False
    cancel_reason: str = ""
    cancelled_by: str = ""
    attempt: int = 0
    #: The data repository commit the dataset was read at; empty when unknown.
    dataset_commit: str = ""
    #: The resolved plan (without resume_from), fixed at submission.
    plan: WorkerPlan | None = None
    #: Worker events of the current attempt already applied, so a service that reattaches to a
    #: running data-parallel job after a restart reads on from there instead of replaying them.
    events_cursor: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        data["spec"] = self.spec.to_dict()
        data["plan"] = self.plan.to_dict() if self.plan else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        fields = dict(data)
        fields["state"] = JobState(fields["state"])
        fields["spec"] = TrainingSpec.from_dict(fields["spec"])
        fields["plan"] = WorkerPlan.from_dict(fields["plan"]) if fields.get("plan") else None
        fields["result"] = RegisteredResult(**fields["result"]) if fields.get("result") else None
        return cls(**fields)
