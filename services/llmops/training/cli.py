"""``llmops train ...``: fine-tuning jobs from a terminal, through the gRPC API.

Base models read ``name`` (latest READY version), ``name:3`` or ``name@champion``; datasets are
paths in the data repository (``data/prepared/sft.jsonl``, at ``--revision``) or ``file://`` URIs.
``watch`` (and ``submit --watch``) follows a job with a progress bar and exits 1 unless it succeeds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmops.common.cli_support import job_state_name, print_json, run_with_client
from llmops.common.clients import TrainingClient
from llmops.proto.common.v1 import compute_pb2, dataset_pb2, job_pb2, model_pb2
from llmops.proto.training.v1 import training_service_pb2 as pb
from llmops.training.convert import FORMATS, METHODS, PRECISIONS

T = TypeVar("T")
train_app = typer.Typer(
    name="train", help="Training jobs: submit, watch, list, cancel.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)
_METHOD_BY_NAME = {name: value for value, name in METHODS.items()}
_FORMAT_BY_NAME = {name: value for value, name in FORMATS.items()}
_PRECISION_BY_NAME = {name: value for value, name in PRECISIONS.items()}
_SCHEDULER_BY_NAME = {
    "cosine": pb.LR_SCHEDULER_COSINE,
    "linear": pb.LR_SCHEDULER_LINEAR,
    "constant": pb.LR_SCHEDULER_CONSTANT,
}
_LORA_METHODS = ("lora", "qlora")

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Training host:port; default from settings (training.address)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]


def register(app: typer.Typer) -> None:
    """Mount ``llmops train`` on the ``llmops`` command."""
    app.add_typer(train_app)


def _run(address: str | None, work: Callable[[TrainingClient], Awaitable[T]]) -> T:
    # Unary calls get the client's default deadline; WatchJob none (a watch lasts as long as the job).
    return run_with_client(TrainingClient, "training", address, work)


def _choice(value: str, table: dict[str, Any], option: str) -> Any:
    if value not in table:
        raise typer.BadParameter(f"{option} must be one of {', '.join(table)}, got {value!r}")
    return table[value]


def _base_ref(text: str) -> model_pb2.ModelRef:
    """``name``, ``name:3`` or ``name@alias``."""
    if "@" in text:
        name, _, alias = text.partition("@")
        if not name or not alias:
            raise typer.BadParameter(f"BASE must be name, name:N or name@alias, got {text!r}")
        return model_pb2.ModelRef(name=name, alias=alias)
    name, sep, version = text.rpartition(":")
    if not sep:
        return model_pb2.ModelRef(name=text)
    if not name or not version.isdigit():
        raise typer.BadParameter(f"BASE must be name, name:N or name@alias, got {text!r}")
    return model_pb2.ModelRef(name=name, version=int(version))


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{option} must look like key=value, got {item!r}")
        pairs[key] = value
    return pairs


def _step_text(job: pb.TrainingJob) -> str:
    if job.total_steps:
        return f"{job.current_step}/{job.total_steps}"
    return str(job.current_step) if job.current_step else ""


def _job_table(jobs: list[pb.TrainingJob]) -> Table:
    table = Table()
    for column in ("id", "base", "method", "state", "progress", "step", "loss", "result", "error"):
        table.add_column(column)
    for job in jobs:
        state = job_state_name(job.state)
        if job.cancel_requested and job.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING):
            state += " (cancelling)"
        loss = job.latest_metrics.get("loss")
        table.add_row(
            job.id,
            f"{job.spec.base_model.name}:{job.spec.base_model.version}",
            METHODS.get(job.spec.method, "?"),
            state,
            f"{job.progress:.0%}",
            _step_text(job),
            f"{loss:.4f}" if loss is not None else "",
            f"{job.result_version.name}:{job.result_version.version}"
            if job.HasField("result_version")
            else "",
            escape(job.error_message),
        )
    return table


def _stats(step: job_pb2.JobStep) -> str:
    parts = [f"step {step.step}/{step.total_steps}" if step.total_steps else f"step {step.step}"]
    if step.loss:
        parts.append(f"loss {step.loss:.4f}")
    if step.learning_rate:
        parts.append(f"lr {step.learning_rate:.2e}")
    if step.tokens_per_second:
        parts.append(f"{step.tokens_per_second:,.0f} tok/s")
    # A data-parallel job: each worker's own seconds per step (worker<rank>_step_seconds), in rank order.
    per_worker = sorted(
        (int(name[6:-13]), value)
        for name, value in step.metrics.items()
        if name.startswith("worker") and name.endswith("_step_seconds") and name[6:-13].isdigit()
    )
    if per_worker:
        parts.append("s/step by worker " + "/".join(f"{value:.2f}" for _, value in per_worker))
    return "  ".join(parts)


def _event_line(event: job_pb2.JobEvent) -> str | None:
    """A line to print above the bar for events worth remembering; ``None`` for the rest."""
    kind = event.WhichOneof("payload")
    if kind == "started":
        started = event.started
        where = f" on {started.worker}" if started.worker else ""
        run = f" (MLflow run {started.mlflow_run_id})" if started.mlflow_run_id else ""
        if started.attempt > 1:
            return f"resumed from step {started.resumed_from_step} (attempt {started.attempt}){where}{run}"
        return f"started{where}{run}"
    if kind == "eval":
        return (
            f"step {event.eval.step}: eval loss {event.eval.loss:.4f}, perplexity {event.eval.perplexity:.2f}"
        )
    if kind == "checkpoint":
        return f"step {event.checkpoint.step}: checkpoint saved to {event.checkpoint.uri}"
    if kind == "finished":
        finished = event.finished
        if finished.HasField("result"):
            return f"registered {finished.result.name}:{finished.result.version}"
        return f"result written to {finished.output_uri}"
    if kind == "failed":
        return f"failed at step {event.failed.step}: {event.failed.reason}"
    if kind == "cancelled":
        cancelled = event.cancelled
        who = f" by {cancelled.cancelled_by}" if cancelled.cancelled_by else ""
        why = f": {cancelled.reason}" if cancelled.reason else ""
        return f"cancelled at step {cancelled.step}{who}{why}"
    if kind == "log":
        level = job_pb2.LogLevel.Name(event.log.level).removeprefix("LOG_LEVEL_").lower()
        return f"{level}: {event.log.message}"
    return None


async def _watch(client: TrainingClient, job_id: str, *, logs: bool = False) -> pb.TrainingJob:
    """Follow a job to its terminal event with a progress bar; the job as it ended."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(f"{job_id} queued", total=1.0, stats="")
        request = pb.WatchJobRequest(job_id=job_id, include_logs=logs)
        async for response in client.stream(client.stub.WatchJob, request, timeout=None):
            event = response.event
            kind = event.WhichOneof("payload")
            if kind == "step":
                step = event.step
                fields: dict[str, Any] = {"stats": _stats(step)} if step.phase == "train" else {}
                bar.update(task, completed=step.progress, description=f"{job_id} {step.phase}", **fields)
            elif kind == "started":
                bar.update(task, description=f"{job_id} running")
            elif kind == "finished":
                bar.update(task, completed=1.0, description=f"{job_id} done")
            elif kind in ("failed", "cancelled"):
                bar.update(task, description=f"{job_id} {kind}")
            line = _event_line(event)
            if line is not None:
                bar.console.print(escape(line), highlight=False)
    final: pb.TrainingJob = (await client.unary(client.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job
    return final


def _show(job: pb.TrainingJob, as_json: bool) -> None:
    print_json(out, job) if as_json else out.print(_job_table([job]))


@train_app.command()
def submit(
    base: Annotated[str, typer.Argument(help="Model to fine-tune: name, name:N or name@alias")],
    dataset: Annotated[str, typer.Argument(help="JSONL file: path in the data repository, or a file:// URI")],
    revision: Annotated[str, typer.Option(help="Git revision of the data repository")] = "",
    data_format: Annotated[
        str, typer.Option("--format", help=f"{' | '.join(_FORMAT_BY_NAME)}; default: inferred")
    ] = "",
    method: Annotated[str, typer.Option(help=" | ".join(_METHOD_BY_NAME))] = "lora",
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (default 1)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps; instead of --epochs")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per device per pass; 0: 8")] = 0,
    grad_accum: Annotated[int, typer.Option(help="Passes per optimizer step; 0: 1")] = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate; 0: 2e-5 full, 2e-4 LoRA")] = 0.0,
    scheduler: Annotated[str, typer.Option(help=" | ".join(_SCHEDULER_BY_NAME))] = "cosine",
    warmup_steps: Annotated[int | None, typer.Option(help="Warmup in optimizer steps")] = None,
    warmup_ratio: Annotated[
        float | None, typer.Option(help="Warmup as a fraction of all steps; instead of --warmup-steps")
    ] = None,
    weight_decay: float = 0.0,
    max_seq_length: Annotated[int, typer.Option(help="Tokens per example; 0: min(1024, context)")] = 0,
    precision: Annotated[
        str, typer.Option(help=f"{' | '.join(_PRECISION_BY_NAME)}; default: the best the device has")
    ] = "",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing")] = False,
    seed: Annotated[int | None, typer.Option(help="Default 42")] = None,
    eval_split: Annotated[float, typer.Option(help="Fraction held out for evaluation, in [0, 0.5]")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps; 0: each epoch")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps; 0: each epoch")] = 0,
    log_every: Annotated[int, typer.Option(help="Report progress every N steps; 0: 10")] = 0,
    dpo_beta: Annotated[float, typer.Option(help="DPO beta; 0: 0.1")] = 0.0,
    lora_r: Annotated[int | None, typer.Option(help="Adapter rank (default 8)")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="Adapter alpha (default 2 x r)")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="Adapter dropout (default 0.05)")] = None,
    target_module: Annotated[
        list[str] | None, typer.Option(help="Module to adapt (repeatable); default: every linear layer")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Merge the adapter and register a full model")
    ] = False,
    cpus: Annotated[float, typer.Option(help="CPU cores per worker; 0: server default")] = 0.0,
    gpus: Annotated[float, typer.Option(help="GPUs per worker; 0: server default")] = 0.0,
    num_workers: Annotated[
        int,
        typer.Option(help="Data-parallel workers (Ray Train DDP; global batch = workers x batch x accum)"),
    ] = 1,
    name: Annotated[str, typer.Option(help="Model to register under; default <base>-<method>")] = "",
    alias: Annotated[list[str] | None, typer.Option(help="Alias for the result (repeatable)")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="key=value for the result (repeatable)")] = None,
    description: str = "",
    register_result: Annotated[bool, typer.Option("--register/--no-register")] = True,
    request_id: Annotated[str, typer.Option(help="Idempotency key: a retry returns the same job")] = "",
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job with a progress bar")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a fine-tuning job (with --watch: follow it; exit 1 unless it succeeds)."""
    method_value = _choice(method, _METHOD_BY_NAME, "--method")
    if epochs is not None and max_steps is not None:
        raise typer.BadParameter("give --epochs or --max-steps, not both")
    if warmup_steps is not None and warmup_ratio is not None:
        raise typer.BadParameter("give --warmup-steps or --warmup-ratio, not both")
    hyper = pb.Hyperparameters(
        per_device_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler=_choice(scheduler, _SCHEDULER_BY_NAME, "--scheduler"),
        weight_decay=weight_decay,
        max_seq_length=max_seq_length,
        precision=_choice(precision, _PRECISION_BY_NAME, "--precision")
        if precision
        else compute_pb2.PRECISION_UNSPECIFIED,
        gradient_checkpointing=gradient_checkpointing,
        eval_split=eval_split,
        eval_every_steps=eval_every,
        checkpoint_every_steps=checkpoint_every,
        logging_every_steps=log_every,
        dpo_beta=dpo_beta,
    )
    if max_steps is not None:
        hyper.max_steps = max_steps
    elif epochs is not None:
        hyper.num_epochs = epochs
    if warmup_steps is not None:
        hyper.warmup_steps = warmup_steps
    elif warmup_ratio is not None:
        hyper.warmup_ratio = warmup_ratio
    if seed is not None:
        hyper.seed = seed
    spec = pb.TrainingJobSpec(
        base_model=_base_ref(base),
        dataset=pb.TrainingDataset(
            ref=dataset_pb2.DatasetRef(path=dataset, revision=revision),
            format=_choice(data_format, _FORMAT_BY_NAME, "--format")
            if data_format
            else pb.DATASET_FORMAT_UNSPECIFIED,
        ),
        method=method_value,
        hyperparameters=hyper,
        resources=compute_pb2.Resources(cpus=cpus, gpus=gpus),
        num_workers=num_workers,
        output_model_name=name,
        register=register_result,
        aliases=alias or [],
        tags=_pairs(tag or [], "--tag"),
        description=description,
    )
    lora_given = (
        lora_r is not None
        or lora_alpha is not None
        or lora_dropout is not None
        or bool(target_module)
        or merge
    )
    if method == "sft" and lora_given:
        raise typer.BadParameter(
            "LoRA options (--lora-*, --target-module, --merge) do not apply to --method sft"
        )
    if method in _LORA_METHODS or (method == "dpo" and lora_given):
        # LORA and QLORA require the field even with every default; DPO trains an adapter only with it.
        spec.lora.CopyFrom(
            pb.LoraConfig(
                r=lora_r or 0, alpha=lora_alpha or 0, target_modules=target_module or [], merge_adapter=merge
            )
        )
        if lora_dropout is not None:
            spec.lora.dropout = lora_dropout

    async def work(client: TrainingClient) -> pb.TrainingJob:
        response = await client.unary(
            client.stub.SubmitJob, pb.SubmitJobRequest(spec=spec, request_id=request_id)
        )
        job: pb.TrainingJob = response.job
        if not watch:
            return job
        if not as_json:
            err.print(f"submitted {job.id}", highlight=False)
        return await _watch(client, job.id)

    job = _run(address, work)
    _show(job, as_json)
    if watch and job.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@train_app.command()
def status(job_id: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Show one job."""
    job = _run(address, lambda c: c.unary(c.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job
    _show(job, as_json)


@train_app.command("watch")
def watch_job(
    job_id: str,
    logs: Annotated[bool, typer.Option("--logs", help="Print the job's log lines too")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Follow a job to its end with a progress bar; exit 1 unless it succeeds."""
    job = _run(address, lambda c: _watch(c, job_id, logs=logs))
    _show(job, as_json)
    if job.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@train_app.command("list")
def list_jobs(
    state: Annotated[
        list[str] | None, typer.Option(help="queued, running, succeeded, failed, cancelled (repeatable)")
    ] = None,
    model: Annotated[str, typer.Option(help="Only jobs registering into this model")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    try:
        states = [job_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in state or []]
    except ValueError:
        raise typer.BadParameter("state must be queued, running, succeeded, failed or cancelled") from None

    async def work(client: TrainingClient) -> list[pb.TrainingJob]:
        jobs: list[pb.TrainingJob] = []
        token = ""
        while True:
            request = pb.ListJobsRequest(states=states, output_model_name=model, page_token=token)
            response = await client.unary(client.stub.ListJobs, request)
            jobs.extend(response.jobs)
            token = response.next_page_token
            if not token:
                return jobs

    jobs = _run(address, work)
    print_json(out, pb.ListJobsResponse(jobs=jobs)) if as_json else out.print(_job_table(jobs))


@train_app.command()
def cancel(job_id: str, reason: str = "", address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Ask a job to stop (it stays RUNNING until its worker stops; `watch` shows when)."""
    request = pb.CancelJobRequest(job_id=job_id, reason=reason)
    job = _run(address, lambda c: c.unary(c.stub.CancelJob, request)).job
    _show(job, as_json)


#: Follow a job to its end with the live progress bar (for scripts such as the pipeline stages).
follow_job = _watch
