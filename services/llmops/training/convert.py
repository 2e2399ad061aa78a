"""Proto <-> domain for the training API: specs both ways, jobs and events out."""

from __future__ import annotations

from llmops.common.errors import InvalidArgument
from llmops.common.jobs import JOB_STATES, timestamp
from llmops.proto.common.v1 import compute_pb2, dataset_pb2, job_pb2, model_pb2
from llmops.proto.training.v1 import training_service_pb2 as pb
from llmops.training.domain import (
    DatasetRef,
    Hyperparameters,
    Job,
    JobEvent,
    LoraSpec,
    Resources,
    TrainingSpec,
)

METHODS = {
    pb.TRAINING_METHOD_SFT: "sft",
    pb.TRAINING_METHOD_LORA: "lora",
    pb.TRAINING_METHOD_QLORA: "qlora",
    pb.TRAINING_METHOD_DPO: "dpo",
}
FORMATS = {
    pb.DATASET_FORMAT_TEXT: "text",
    pb.DATASET_FORMAT_PROMPT_COMPLETION: "prompt_completion",
    pb.DATASET_FORMAT_CHAT: "chat",
    pb.DATASET_FORMAT_PREFERENCE: "preference",
}
SCHEDULERS = {
    pb.LR_SCHEDULER_UNSPECIFIED: "cosine",
    pb.LR_SCHEDULER_COSINE: "cosine",
    pb.LR_SCHEDULER_LINEAR: "linear",
    pb.LR_SCHEDULER_CONSTANT: "constant",
}
PRECISIONS = {
    compute_pb2.PRECISION_FP32: "fp32",
    compute_pb2.PRECISION_BF16: "bf16",
    compute_pb2.PRECISION_FP16: "fp16",
}
STATES = JOB_STATES
LEVELS = {
    "debug": job_pb2.LOG_LEVEL_DEBUG,
    "info": job_pb2.LOG_LEVEL_INFO,
    "warning": job_pb2.LOG_LEVEL_WARNING,
    "error": job_pb2.LOG_LEVEL_ERROR,
}


def _reverse(table: dict[int, str]) -> dict[str, int]:
    return {name: value for value, name in table.items() if value}


def spec_from_proto(spec: pb.TrainingJobSpec) -> TrainingSpec:
    """The domain spec; enum values outside the tables are INVALID_ARGUMENT naming the field."""
    if spec.method not in METHODS:
        raise InvalidArgument(f"required; one of {', '.join(METHODS.values())}", field="spec.method")
    if spec.dataset.format and spec.dataset.format not in FORMATS:
        raise InvalidArgument("unknown format", field="spec.dataset.format")
    hp = spec.hyperparameters
    if hp.lr_scheduler not in SCHEDULERS:
        raise InvalidArgument("unknown scheduler", field="spec.hyperparameters.lr_scheduler")
    if hp.precision and hp.precision not in PRECISIONS:
        raise InvalidArgument("unknown precision", field="spec.hyperparameters.precision")
    selector = spec.base_model.WhichOneof("selector")
    duration = hp.WhichOneof("duration")
    warmup = hp.WhichOneof("warmup")
    lora = None
    if spec.HasField("lora"):
        lora = LoraSpec(
            r=spec.lora.r,
            alpha=spec.lora.alpha,
            dropout=spec.lora.dropout if spec.lora.HasField("dropout") else None,
            target_modules=tuple(spec.lora.target_modules),
            merge_adapter=spec.lora.merge_adapter,
        )
    return TrainingSpec(
        base_name=spec.base_model.name,
        base_version=spec.base_model.version if selector == "version" else None,
        base_alias=spec.base_model.alias if selector == "alias" else None,
        dataset=DatasetRef(
            path=spec.dataset.ref.path, revision=spec.dataset.ref.revision, repo=spec.dataset.ref.repo
        ),
        data_format=FORMATS.get(spec.dataset.format),  # type: ignore[arg-type]
        method=METHODS[spec.method],  # type: ignore[arg-type]
        hyperparameters=Hyperparameters(
            num_epochs=hp.num_epochs if duration == "num_epochs" else None,
            max_steps=hp.max_steps if duration == "max_steps" else None,
            per_device_batch_size=hp.per_device_batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            learning_rate=hp.learning_rate,
            lr_scheduler=SCHEDULERS[hp.lr_scheduler],  # type: ignore[arg-type]
            warmup_steps=hp.warmup_steps if warmup == "warmup_steps" else None,
            warmup_ratio=hp.warmup_ratio if warmup == "warmup_ratio" else None,
            weight_decay=hp.weight_decay,
            max_grad_norm=hp.max_grad_norm,
            max_seq_length=hp.max_seq_length,
            precision=PRECISIONS.get(hp.precision),  # type: ignore[arg-type]
            gradient_checkpointing=hp.gradient_checkpointing,
            seed=hp.seed if hp.HasField("seed") else None,
            eval_split=hp.eval_split,
            eval_every_steps=hp.eval_every_steps,
            checkpoint_every_steps=hp.checkpoint_every_steps,
            logging_every_steps=hp.logging_every_steps,
            dpo_beta=hp.dpo_beta,
        ),
        lora=lora,
        resources=Resources(
            cpus=spec.resources.cpus,
            gpus=spec.resources.gpus,
            memory_bytes=spec.resources.memory_bytes,
            accelerator_type=spec.resources.accelerator_type,
        ),
        num_workers=spec.num_workers,
        output_model_name=spec.output_model_name,
        register=spec.register if spec.HasField("register") else True,
        aliases=tuple(spec.aliases),
        tags=dict(spec.tags),
        description=spec.description,
        mlflow_experiment=spec.mlflow_experiment,
    )


def spec_to_proto(spec: TrainingSpec) -> pb.TrainingJobSpec:
    hp = spec.hyperparameters
    base = model_pb2.ModelRef(name=spec.base_name)
    if spec.base_version is not None:
        base.version = spec.base_version
    elif spec.base_alias:
        base.alias = spec.base_alias
    hyper = pb.Hyperparameters(
        per_device_batch_size=hp.per_device_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler=_reverse(SCHEDULERS)[hp.lr_scheduler],  # type: ignore[arg-type]
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        max_seq_length=hp.max_seq_length,
        precision=_reverse(PRECISIONS)[hp.precision] if hp.precision else 0,  # type: ignore[arg-type]
        gradient_checkpointing=hp.gradient_checkpointing,
        eval_split=hp.eval_split,
        eval_every_steps=hp.eval_every_steps,
        checkpoint_every_steps=hp.checkpoint_every_steps,
        logging_every_steps=hp.logging_every_steps,
        dpo_beta=hp.dpo_beta,
    )
    if hp.max_steps is not None:
        hyper.max_steps = hp.max_steps
    elif hp.num_epochs is not None:
        hyper.num_epochs = hp.num_epochs
    if hp.warmup_steps is not None:
        hyper.warmup_steps = hp.warmup_steps
    elif hp.warmup_ratio is not None:
        hyper.warmup_ratio = hp.warmup_ratio
    if hp.seed is not None:
        hyper.seed = hp.seed
    message = pb.TrainingJobSpec(
        base_model=base,
        dataset=pb.TrainingDataset(
            ref=dataset_pb2.DatasetRef(
                path=spec.dataset.path, revision=spec.dataset.revision, repo=spec.dataset.repo
            ),
            format=_reverse(FORMATS)[spec.data_format] if spec.data_format else 0,  # type: ignore[arg-type]
        ),
        method=_reverse(METHODS)[spec.method],  # type: ignore[arg-type]
        hyperparameters=hyper,
        resources=compute_pb2.Resources(
            cpus=spec.resources.cpus,
            gpus=spec.resources.gpus,
            memory_bytes=spec.resources.memory_bytes,
            accelerator_type=spec.resources.accelerator_type,
        ),
        num_workers=spec.num_workers,
        output_model_name=spec.output_model_name,
        register=spec.register,
        aliases=list(spec.aliases),
        tags=dict(spec.tags),
        description=spec.description,
        mlflow_experiment=spec.mlflow_experiment,
    )
    if spec.lora is not None:
        message.lora.CopyFrom(
            pb.LoraConfig(
                r=spec.lora.r,
                alpha=spec.lora.alpha,
                target_modules=list(spec.lora.target_modules),
                merge_adapter=spec.lora.merge_adapter,
            )
        )
        if spec.lora.dropout is not None:
            message.lora.dropout = spec.lora.dropout
    return message


def job_to_proto(job: Job) -> pb.TrainingJob:
    message = pb.TrainingJob(
        id=job.id,
        spec=spec_to_proto(job.spec),
        state=STATES[job.state],
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        progress=job.progress,
        current_step=job.current_step,
        total_steps=job.total_steps,
        latest_metrics=job.latest_metrics,
        mlflow_run_id=job.mlflow_run_id,
        checkpoint_step=job.checkpoint_step,
        output_uri=job.output_uri,
        error_message=job.error_message,
        created_by=job.created_by,
        request_id=job.request_id,
        cancel_requested=job.cancel_requested,
    )
    if job.result is not None:
        message.result_version.CopyFrom(model_pb2.ModelRef(name=job.result.name, version=job.result.version))
    return message


def event_to_proto(event: JobEvent) -> job_pb2.JobEvent:
    message = job_pb2.JobEvent(
        job_id=event.job_id, sequence=event.sequence, time=timestamp(event.time), state=STATES[event.state]
    )
    kind = event.kind
    if kind == "queued":
        message.queued.queue_position = event.queue_position
    elif kind == "started":
        message.started.CopyFrom(
            job_pb2.JobStarted(
                worker=event.worker,
                attempt=event.attempt,
                resumed_from_step=event.resumed_from_step,
                mlflow_run_id=event.mlflow_run_id,
            )
        )
    elif kind == "step":
        message.step.CopyFrom(
            job_pb2.JobStep(
                step=event.step,
                total_steps=event.total_steps,
                loss=event.loss,
                learning_rate=event.learning_rate,
                tokens_per_second=event.tokens_per_second,
                progress=event.progress,
                phase=event.phase,
                epoch=event.epoch,
                metrics=dict(event.metrics),
            )
        )
    elif kind == "eval":
        message.eval.CopyFrom(
            job_pb2.JobEval(
                step=event.step, loss=event.loss, perplexity=event.perplexity, metrics=dict(event.metrics)
            )
        )
    elif kind == "checkpoint":
        message.checkpoint.CopyFrom(job_pb2.JobCheckpoint(step=event.step, uri=event.uri))
    elif kind == "finished":
        message.finished.CopyFrom(job_pb2.JobFinished(output_uri=event.uri, metrics=dict(event.metrics)))
        if event.result is not None:
            message.finished.result.CopyFrom(
                model_pb2.ModelRef(name=event.result.name, version=event.result.version)
            )
    elif kind == "failed":
        message.failed.CopyFrom(job_pb2.JobFailed(reason=event.message, step=event.step))
    elif kind == "cancelled":
        message.cancelled.CopyFrom(
            job_pb2.JobCancelled(reason=event.message, cancelled_by=event.cancelled_by, step=event.step)
        )
    else:
        level = LEVELS.get(event.level, job_pb2.LOG_LEVEL_INFO)
        message.log.CopyFrom(job_pb2.JobLog(level=level, message=event.message))  # type: ignore[arg-type]
    return message
