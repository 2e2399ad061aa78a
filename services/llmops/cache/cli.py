"""``llmops cache stats|invalidate``: the cache service from a terminal, through its gRPC API."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from llmops.common.cli_support import resolve_address, run_with_client
from llmops.common.clients import CacheClient
from llmops.proto.cache.v1 import cache_service_pb2 as pb

T = TypeVar("T")
cache_app = typer.Typer(
    name="cache", help="Response cache: statistics and invalidation.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Cache service host:port; default from settings (cache.address)"),
]


def register(app: typer.Typer) -> None:
    """Mount ``llmops cache`` on the ``llmops`` command."""
    app.add_typer(cache_app)


def _address(address: str | None) -> str:
    return resolve_address("cache", address)


def _run(address: str | None, work: Callable[[CacheClient], Awaitable[T]]) -> T:
    return run_with_client(CacheClient, "cache", address, work, timeout=60)


def parse_target(text: str) -> pb.InvalidateRequest:
    """``name`` (every version), ``name:3`` (one version) or ``name@champion`` (one alias)."""
    if "@" in text:
        name, _, alias = text.partition("@")
        return pb.InvalidateRequest(model_name=name, alias=alias)
    name, sep, version = text.rpartition(":")
    if sep:
        if not version.isdigit():
            raise typer.BadParameter(f"version must be a number, got {version!r}")
        return pb.InvalidateRequest(model_name=name, version=int(version))
    return pb.InvalidateRequest(model_name=text)


@cache_app.command()
def stats(
    address: AddressOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Hits, misses, errors and sizes of the cache."""
    response = _run(address, lambda client: client.unary(client.stub.Stats, pb.StatsRequest()))
    if as_json:
        document = json_format.MessageToDict(
            response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        out.print_json(json.dumps(document))
        return
    table = Table(title="cache", show_header=False)
    for label, value in (
        ("hits", f"{response.hits:,}"),
        ("misses", f"{response.misses:,}"),
        ("hit ratio", f"{response.hit_ratio:.1%}"),
        ("bypasses", f"{response.bypasses:,}"),
        ("errors", f"{response.errors:,}"),
        ("stores", f"{response.stores:,}"),
        ("invalidated", f"{response.invalidated:,}"),
        ("entries", f"{response.entries:,}"),
        ("bytes", f"{response.bytes / 1e6:.2f} MB"),
        ("since", response.since.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")),
    ):
        table.add_row(label, value)
    out.print(table)


@cache_app.command()
def invalidate(
    target: Annotated[str, typer.Argument(help="name (every version), name:N or name@alias")],
    tenant: Annotated[str, typer.Option(help="Only this tenant's entries; default all tenants")] = "",
    address: AddressOption = None,
) -> None:
    """Remove cached answers of a model, a version or an alias."""
    request = parse_target(target)
    request.tenant = tenant
    response = _run(address, lambda client: client.unary(client.stub.Invalidate, request))
    out.print(f"removed {response.removed:,} entries", highlight=False)
