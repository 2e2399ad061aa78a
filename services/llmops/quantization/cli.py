"""``llmops quantize ...``: quantization jobs from a terminal, through the gRPC API.

Sources read ``name`` (latest version) or ``name:3``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmops.common.cli_support import job_state_name, print_json, resolve_address, run_with_client
from llmops.common.clients import QuantizationClient
from llmops.proto.common.v1 import dataset_pb2, job_pb2, model_pb2
from llmops.proto.quantization.v1 import quantization_service_pb2 as pb
from llmops.quantization.grpc_app import METHODS

T = TypeVar("T")
quantize_app = typer.Typer(
    name="quantize", help="Quantization jobs: submit, watch, list, cancel.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)
_METHOD_BY_NAME = {name: value for value, name in METHODS.items()}

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Quantization host:port; default from settings (quantization.address)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]


def register(app: typer.Typer) -> None:
    """Mount ``llmops quantize`` on the ``llmops`` command."""
    app.add_typer(quantize_app)


def _address(address: str | None) -> str:
    return resolve_address("quantization", address)


def _run(address: str | None, work: Callable[[QuantizationClient], Awaitable[T]]) -> T:
    return run_with_client(QuantizationClient, "quantization", address, work)


def _job_table(jobs: list[pb.QuantizationJob]) -> Table:
    table = Table()
    for column in (
        "id",
        "source",
        "method",
        "state",
        "progress",
        "size ratio",
        "ppl before",
        "ppl after",
        "result",
    ):
        table.add_column(column)
    for job in jobs:
        result = job.result
        table.add_row(
            job.id,
            f"{job.spec.source.name}:{job.spec.source.version}",
            METHODS.get(job.spec.method, "?"),
            job_state_name(job.state),
            f"{job.progress:.0%}",
            f"{result.size_ratio:.3f}" if job.HasField("result") else "",
            f"{result.perplexity_before:.2f}" if result.HasField("perplexity_before") else "",
            f"{result.perplexity_after:.2f}" if result.HasField("perplexity_after") else "",
            f"{result.result_version.name}:{result.result_version.version}"
            if result.HasField("result_version")
            else "",
        )
    return table


async def _watch(client: QuantizationClient, job_id: str) -> pb.QuantizationJob:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(job_id, total=1.0)
        async for response in client.stream(
            client.stub.WatchJob, pb.WatchJobRequest(job_id=job_id), timeout=None
        ):
            event = response.event
            kind = event.WhichOneof("payload")
            if kind == "step":
                bar.update(task, completed=event.step.progress, description=f"{job_id} {event.step.phase}")
            elif kind == "finished":
                bar.update(task, completed=1.0, description=f"{job_id} done")
            elif kind in ("failed", "cancelled"):
                bar.update(task, description=f"{job_id} {kind}")
    final: pb.QuantizationJob = (await client.unary(client.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job
    return final


@quantize_app.command()
def submit(
    source: Annotated[str, typer.Argument(help="Model to quantize: name or name:version")],
    method: Annotated[str, typer.Option(help=f"One of {', '.join(_METHOD_BY_NAME)}")] = "int8_dynamic",
    bits: int = 0,
    group_size: int = 0,
    gguf_type: str = "",
    eval_samples: Annotated[int, typer.Option(help="Held-out sequences for perplexity; 0 skips it")] = 0,
    seq_len: int = 0,
    eval_text: Annotated[
        str, typer.Option(help="Text file or folder to evaluate on; default: held-out stdlib text")
    ] = "",
    throughput_tokens: Annotated[int, typer.Option(help="Tokens per speed measurement; 0 skips it")] = 0,
    calibration_samples: Annotated[
        int, typer.Option(help="Calibration sequences for gptq/awq (of seq-len tokens); 0 means 128")
    ] = 0,
    calibration_text: Annotated[
        str,
        typer.Option(
            help="Calibration text file, .jsonl or folder for gptq/awq; default: held-out stdlib text "
            "after the evaluation's"
        ),
    ] = "",
    calibration_revision: Annotated[
        str,
        typer.Option(
            help="Git/DVC revision of the data repository to read --calibration-text at (then a path "
            "relative to the repository); default: a file on the server"
        ),
    ] = "",
    name: Annotated[str, typer.Option(help="Model to register the result under")] = "",
    register_result: Annotated[bool, typer.Option("--register/--no-register")] = True,
    request_id: str = "",
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job with a progress bar")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a quantization job."""
    if method not in _METHOD_BY_NAME:
        raise typer.BadParameter(f"method must be one of {', '.join(_METHOD_BY_NAME)}")
    model, _, version = source.partition(":")
    ref = model_pb2.ModelRef(name=model)
    if version:
        if not version.isdigit():
            raise typer.BadParameter("source must be name or name:version")
        ref.version = int(version)
    spec = pb.QuantizationJobSpec(
        source=ref,
        method=_METHOD_BY_NAME[method],  # type: ignore[arg-type]
        bits=bits,
        group_size=group_size,
        gguf_type=gguf_type,
        output_model_name=name,
        register=register_result,
    )
    if eval_samples or throughput_tokens:
        spec.eval.measure_throughput = bool(throughput_tokens)
        spec.eval.throughput_tokens = throughput_tokens
        if eval_samples:
            spec.eval.dataset.CopyFrom(
                pb.DatasetSample(
                    ref=dataset_pb2.DatasetRef(path=eval_text), num_samples=eval_samples, seq_len=seq_len
                )
            )
    if method in ("gptq", "awq") or calibration_samples or calibration_text or calibration_revision:
        spec.calibration.CopyFrom(
            pb.DatasetSample(
                ref=dataset_pb2.DatasetRef(path=calibration_text, revision=calibration_revision),
                num_samples=calibration_samples,
                seq_len=seq_len,
            )
        )

    async def work(client: QuantizationClient) -> pb.QuantizationJob:
        response = await client.unary(
            client.stub.SubmitJob, pb.SubmitJobRequest(spec=spec, request_id=request_id)
        )
        job: pb.QuantizationJob = response.job
        return await _watch(client, job.id) if watch else job

    job = _run(address, work)
    if as_json:
        print_json(out, job)
    else:
        out.print(_job_table([job]))


@quantize_app.command()
def status(job_id: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Show one job."""
    job = _run(address, lambda c: c.unary(c.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job
    print_json(out, job) if as_json else out.print(_job_table([job]))


@quantize_app.command("watch")
def watch_job(job_id: str, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Follow a job to its end with a progress bar."""
    job = _run(address, lambda c: _watch(c, job_id))
    print_json(out, job) if as_json else out.print(_job_table([job]))
    if job.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@quantize_app.command("list")
def list_jobs(
    state: Annotated[
        list[str] | None, typer.Option(help="queued, running, succeeded, failed, cancelled")
    ] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    try:
        states = [job_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in state or []]
    except ValueError:
        raise typer.BadParameter("state must be queued, running, succeeded, failed or cancelled") from None
    response = _run(address, lambda c: c.unary(c.stub.ListJobs, pb.ListJobsRequest(states=states)))
    print_json(out, response) if as_json else out.print(_job_table(list(response.jobs)))


@quantize_app.command()
def cancel(job_id: str, reason: str = "", address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Ask a job to stop."""
    request = pb.CancelJobRequest(job_id=job_id, reason=reason)
    job = _run(address, lambda c: c.unary(c.stub.CancelJob, request)).job
    print_json(out, job) if as_json else out.print(_job_table([job]))


#: Follow a job to its end with the live progress bar (for scripts such as the pipeline stages).
follow_job = _watch
