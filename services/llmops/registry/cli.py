"""``llmops models ...``: the registry from a terminal, through the gRPC API (never the store directly).

Model references read ``name`` (latest READY version), ``name:3`` or ``name@champion``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from llmops.common.cli_support import resolve_address, run_with_client
from llmops.common.clients import RegistryClient
from llmops.common.convert import model_ref_to_proto
from llmops.common.errors import LLMOpsError
from llmops.proto.common.v1 import dataset_pb2, model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from llmops.registry.convert import FORMAT_TO_PROTO
from llmops.registry.domain import ModelFormat, ModelRef
from llmops.registry.weights_cli import weights_app

T = TypeVar("T")
models_app = typer.Typer(
    name="models", help="Model registry: versions, aliases, lineage.", no_args_is_help=True
)
models_app.add_typer(weights_app)
out = Console()
err = Console(stderr=True)

AddressOption = Annotated[
    str | None, typer.Option("--address", help="Registry host:port; default from settings (registry.address)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]


def register(app: typer.Typer) -> None:
    """Mount ``llmops models`` (with ``llmops models weights``) on the ``llmops`` command."""
    app.add_typer(models_app)


def _address(address: str | None) -> str:
    return resolve_address("registry", address)


def _run(address: str | None, work: Callable[[RegistryClient], Awaitable[T]]) -> T:
    return run_with_client(RegistryClient, "registry", address, work)


def _ref(text: str) -> model_pb2.ModelRef:
    try:
        return model_ref_to_proto(ModelRef.parse(text))
    except LLMOpsError as exc:
        raise typer.BadParameter(exc.message) from None


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out_pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} must look like key=value, got {item!r}")
        out_pairs[key] = value
    return out_pairs


def _print_json(message: Any) -> None:
    out.print_json(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True)))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def _version_table(versions: list[pb.ModelVersion], title: str) -> Table:
    table = Table(title=title)
    for column in ("version", "format", "status", "size", "params", "aliases", "parent", "created"):
        table.add_column(column)
    for v in versions:
        parent = f"{v.lineage.parent.name}:{v.lineage.parent.version}" if v.lineage.HasField("parent") else ""
        table.add_row(
            str(v.version),
            model_pb2.ModelFormat.Name(v.format).removeprefix("MODEL_FORMAT_").lower(),
            pb.VersionStatus.Name(v.status).removeprefix("VERSION_STATUS_"),
            f"{v.size_bytes / 1e6:.1f} MB",
            f"{v.parameter_count:,}" if v.parameter_count else "",
            ", ".join(v.aliases),
            parent,
            v.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
    return table


@models_app.command("list")
def list_models(
    prefix: Annotated[str, typer.Option(help="Only models whose name starts with this")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List models."""

    async def work(client: RegistryClient) -> list[pb.Model]:
        models: list[pb.Model] = []
        token = ""
        while True:
            page = await client.unary(
                client.stub.ListModels,
                pb.ListModelsRequest(page_size=1000, page_token=token, name_prefix=prefix),
            )
            models.extend(page.models)
            token = page.next_page_token
            if not token:
                return models

    models = _run(address, work)
    if as_json:
        _print_json(pb.ListModelsResponse(models=models))
        return
    table = Table(title="models")
    for column in ("name", "versions", "latest", "aliases", "updated"):
        table.add_column(column)
    for m in models:
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items()))
        updated = m.updated_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(m.name, str(m.version_count), str(m.latest_version or ""), aliases, updated)
    out.print(table)


@models_app.command()
def show(
    ref: Annotated[str, typer.Argument(help="name, name:N or name@alias")],
    history: Annotated[bool, typer.Option(help="Also list the model's alias moves")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a model and its versions, or one version in full (name:N, name@alias)."""
    parsed = _ref(ref)
    single = parsed.WhichOneof("selector") is not None

    async def work(client: RegistryClient) -> tuple[Any, list[pb.ModelVersion], list[pb.AliasHistoryEntry]]:
        moves: list[pb.AliasHistoryEntry] = []
        if history:
            moves = list(
                (
                    await client.unary(
                        client.stub.ListAliasHistory, pb.ListAliasHistoryRequest(model_name=parsed.name)
                    )
                ).entries
            )
        if single:
            version = (await client.unary(client.stub.GetVersion, pb.GetVersionRequest(model=parsed))).version
            return version, [version], moves
        model = (await client.unary(client.stub.GetModel, pb.GetModelRequest(name=parsed.name))).model
        versions = await client.unary(
            client.stub.ListVersions, pb.ListVersionsRequest(model_name=parsed.name)
        )
        return model, list(versions.versions), moves

    head, versions, moves = _run(address, work)
    if as_json:
        _print_json(head)
        return
    if single:
        out.print(_version_table(versions, f"{parsed.name}:{versions[0].version}"))
        for label, value in (
            ("artifact", head.artifact_uri),
            ("manifest sha256", head.manifest_sha256),
            ("base model", head.base_model),
            ("created by", head.created_by),
            ("metrics", ", ".join(f"{k}={v:g}" for k, v in sorted(head.metrics.items()))),
            ("tags", ", ".join(f"{k}={v}" for k, v in sorted(head.tags.items()))),
        ):
            if value:
                out.print(f"[bold]{label}:[/bold] {escape(value)}", highlight=False)
        files = Table(title="files")
        for column in ("path", "bytes", "sha256"):
            files.add_column(column)
        for f in head.manifest:
            files.add_row(f.path, f"{f.size_bytes:,}", f.sha256[:16] + "…")
        out.print(files)
    else:
        out.print(f"[bold]{head.name}[/bold] {escape(head.description)}", highlight=False)
        out.print(_version_table(versions, f"{head.name}: {head.version_count} versions"))
    if moves:
        table = Table(title="alias history")
        for column in ("when", "alias", "from", "to", "by", "reason"):
            table.add_column(column)
        for m in moves:
            when = m.moved_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(
                when, m.alias, str(m.from_version or "-"), str(m.to_version or "-"), m.moved_by, m.reason
            )
        out.print(table)


@models_app.command("register")
def register_version(
    name: Annotated[str, typer.Argument(help="Model name")],
    directory: Annotated[
        Path | None,
        typer.Argument(help="Folder to upload (omit with --source-uri)", exists=True, file_okay=False),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="fp32|bf16|fp16|int8|int4|gguf|adapter")] = "fp32",
    create: Annotated[bool, typer.Option(help="Create the model when it does not exist")] = True,
    alias: Annotated[
        list[str] | None, typer.Option(help="Alias to point at the new version (repeatable)")
    ] = None,
    base_model: Annotated[str, typer.Option(help="Foundation model, for people")] = "",
    adapter_base: Annotated[
        str | None, typer.Option(help="For adapters: the base version (name:N or name@alias)")
    ] = None,
    parent: Annotated[str | None, typer.Option(help="Lineage parent (name:N or name@alias)")] = None,
    dataset: Annotated[str | None, typer.Option(help="Lineage dataset: DVC path[@revision]")] = None,
    mlflow_run: Annotated[str, typer.Option(help="MLflow run that produced it")] = "",
    tag: Annotated[list[str] | None, typer.Option(help="key=value (repeatable)")] = None,
    metric: Annotated[list[str] | None, typer.Option(help="name=number (repeatable)")] = None,
    description: Annotated[str, typer.Option(help="Free text")] = "",
    source_uri: Annotated[str, typer.Option(help="Let the server copy the files from this URI instead")] = "",
    request_id: Annotated[str, typer.Option(help="Idempotency key: a retry returns the first version")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a folder (Hugging Face layout, adapter or GGUF) as a new version."""
    try:
        model_format = FORMAT_TO_PROTO[ModelFormat(fmt.lower())]
    except ValueError:
        raise typer.BadParameter(f"unknown format {fmt!r}", param_hint="--format") from None
    if (directory is None) == (not source_uri):
        raise typer.BadParameter("give either DIRECTORY or --source-uri")
    try:
        metrics = {k: float(v) for k, v in _pairs(metric or [], "--metric").items()}
    except ValueError:
        raise typer.BadParameter("metric values must be numbers", param_hint="--metric") from None
    lineage = pb.Lineage(mlflow_run_id=mlflow_run)
    if parent:
        lineage.parent.CopyFrom(_ref(parent))
    if dataset:
        path, _, revision = dataset.partition("@")
        lineage.dataset.CopyFrom(dataset_pb2.DatasetRef(path=path, revision=revision))
    metadata = pb.VersionMetadata(
        model_name=name,
        create_model=create,
        format=model_format,
        base_model=base_model,
        lineage=lineage,
        metrics=metrics,
        tags=_pairs(tag or [], "--tag"),
        description=description,
        source_uri=source_uri,
        aliases=alias or [],
        request_id=request_id,
    )
    if adapter_base:
        metadata.adapter_base.CopyFrom(_ref(adapter_base))

    async def work(client: RegistryClient) -> pb.ModelVersion:
        from llmops.common.artifacts.client import upload_directory

        if directory is None:
            request = pb.RegisterVersionRequest(metadata=metadata)
            return (
                await client.client_stream(client.stub.RegisterVersion, _one(request), timeout=3600)
            ).version
        with _progress() as progress:
            task = progress.add_task(f"upload {name}", total=None)
            return await upload_directory(
                client,
                metadata,
                directory,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )

    version = _run(address, work)
    if as_json:
        _print_json(version)
        return
    out.print(
        f"registered [bold]{version.name}:{version.version}[/bold] ({version.size_bytes:,} bytes)",
        highlight=False,
    )
    out.print(_version_table([version], f"{version.name}:{version.version}"))


async def _one(request: pb.RegisterVersionRequest) -> AsyncIterator[pb.RegisterVersionRequest]:
    yield request


@models_app.command("import")
def import_command(
    source: Annotated[Path, typer.Argument(help="Hugging Face model folder, or a .gguf file")],
    name: Annotated[str | None, typer.Option(help="Model name; default from the file or folder name")] = None,
    alias: Annotated[list[str] | None, typer.Option(help="Alias to point at it (repeatable)")] = None,
    description: Annotated[str, typer.Option(help="Free text")] = "",
    base_model: Annotated[str, typer.Option(help="Foundation model, e.g. HuggingFaceTB/SmolLM2-135M")] = "",
    dtype: Annotated[str | None, typer.Option(help="GGUF only: fp32 (default) or bf16")] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Import a model made elsewhere as a new root version, tagged with its source (GGUF is converted)."""

    async def work(client: RegistryClient) -> pb.ModelVersion:
        from llmops.registry.importer import detect_source, import_model

        detect_source(source)  # a wrong path fails with its one-line error before any progress bar
        with _progress() as progress:
            task = progress.add_task(f"import {source.name}", total=None)
            return await import_model(
                client, source, name, aliases=alias or [], description=description,
                base_model=base_model, dtype=dtype,
                stage=lambda text: progress.update(task, description=text),
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )  # fmt: skip

    version = _run(address, work)
    if as_json:
        _print_json(version)
        return
    out.print(
        f"imported [bold]{version.name}:{version.version}[/bold] ({version.size_bytes:,} bytes)",
        highlight=False,
    )
    out.print(_version_table([version], f"{version.name}:{version.version}"))


@models_app.command("alias")
def alias_command(
    name: Annotated[str, typer.Argument(help="Model name")],
    alias: Annotated[str, typer.Argument(help="Alias, e.g. champion")],
    version: Annotated[int | None, typer.Argument(help="Version to point at (omit with --delete)")] = None,
    delete: Annotated[bool, typer.Option("--delete", help="Remove the alias")] = False,
    expect: Annotated[
        int | None, typer.Option(help="Compare-and-set: the version the alias must point at now (0: absent)")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, for the history")] = "",
    address: AddressOption = None,
) -> None:
    """Point an alias at a version (or --delete it); every move is recorded."""
    if delete == (version is not None):
        raise typer.BadParameter("give VERSION, or --delete without one")

    async def work(client: RegistryClient) -> pb.AliasHistoryEntry:
        if delete:
            request = pb.DeleteAliasRequest(model_name=name, alias=alias, reason=reason)
            if expect is not None:
                request.expected_current_version = expect
            return (await client.unary(client.stub.DeleteAlias, request)).entry
        set_request = pb.SetAliasRequest(model_name=name, alias=alias, version=version or 0, reason=reason)
        if expect is not None:
            set_request.expected_current_version = expect
        return (await client.unary(client.stub.SetAlias, set_request)).entry

    entry = _run(address, work)
    before = entry.from_version or "nothing"
    after = entry.to_version or "nothing"
    out.print(f"{name}@{alias}: {before} → {after}", markup=False, highlight=False)


@models_app.command()
def download(
    ref: Annotated[str, typer.Argument(help="name, name:N or name@alias")],
    destination: Annotated[Path, typer.Argument(help="Folder to write the files into")],
    path: Annotated[list[str] | None, typer.Option(help="Only this file (repeatable)")] = None,
    address: AddressOption = None,
) -> None:
    """Download a version's files, each checked against its sha256 before it appears."""
    parsed = _ref(ref)

    async def work(client: RegistryClient) -> int:
        from llmops.common.artifacts.client import download_to_directory

        with _progress() as progress:
            task = progress.add_task(f"download {ref}", total=None)
            files = await download_to_directory(
                client,
                parsed,
                destination,
                paths=path or [],
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        return len(files)

    count = _run(address, work)
    out.print(f"{count} files verified and written to {destination}", markup=False, highlight=False)


@models_app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="name, name:N or name@alias")],
    max_depth: Annotated[int, typer.Option(help="Most versions to show (0: all)")] = 0,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the chain of versions from this one back to its root."""
    parsed = _ref(ref)

    async def work(client: RegistryClient) -> pb.GetLineageResponse:
        return await client.unary(
            client.stub.GetLineage, pb.GetLineageRequest(model=parsed, max_depth=max_depth)
        )

    chain = _run(address, work)
    if as_json:
        _print_json(chain)
        return
    for depth, v in enumerate(chain.versions):
        fmt = model_pb2.ModelFormat.Name(v.format).removeprefix("MODEL_FORMAT_").lower()
        extra = [f"run {v.lineage.mlflow_run_id}"] if v.lineage.mlflow_run_id else []
        if v.lineage.HasField("dataset"):
            extra.append(f"data {v.lineage.dataset.path}@{v.lineage.dataset.revision or 'workspace'}")
        if v.lineage.job_id:
            extra.append(f"job {v.lineage.job_id}")
        suffix = f"  ({'; '.join(extra)})" if extra else ""
        out.print(f"{'  ' * depth}{'└─ ' if depth else ''}{v.name}:{v.version} [{fmt}]{suffix}", markup=False)
    if chain.truncated:
        out.print("… (chain truncated)")


__all__ = ["models_app", "register"]
