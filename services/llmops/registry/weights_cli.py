"""``llmops models weights ...``: a model's traffic split between its aliases, through the gRPC API.

llmops models weights set llm champion=90 challenger=10 --expect-revision 3 --reason canary
llmops models weights get llm --history
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from llmops.common.cli_support import run_with_client
from llmops.common.clients import RegistryClient
from llmops.proto.registry.v1 import registry_service_pb2 as pb

weights_app = typer.Typer(
    name="weights",
    help="Traffic split between a model's aliases (champion 90, challenger 10) and its history.",
    no_args_is_help=True,
)
out = Console()

AddressOption = Annotated[
    str | None, typer.Option("--address", help="Registry host:port; default from settings (registry.address)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]


def parse_weights(items: list[str]) -> dict[str, int]:
    """``["champion=90", "challenger=10"]`` as a dict; ``typer.BadParameter`` for anything else."""
    weights: dict[str, int] = {}
    for item in items:
        alias, sep, value = item.partition("=")
        if not sep or not alias:
            raise typer.BadParameter(f"weights look like alias=N, got {item!r}")
        if alias in weights:
            raise typer.BadParameter(f"alias {alias!r} given twice")
        try:
            weights[alias] = int(value)
        except ValueError:
            raise typer.BadParameter(f"weight of {alias!r} must be an integer, got {value!r}") from None
    return weights


def _dict(message: Any) -> Any:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _describe(weights: pb.AliasWeights) -> str:
    total = sum(weights.weights.values())
    parts = [
        f"{alias}={weight} ({100 * weight / total:.1f}%)" for alias, weight in sorted(weights.weights.items())
    ]
    return ", ".join(parts) if parts else "no split"


@weights_app.command("set")
def set_weights(
    name: Annotated[str, typer.Argument(help="Model name")],
    weights: Annotated[
        list[str], typer.Argument(help="alias=N for each alias, e.g. champion=90 challenger=10")
    ],
    expect_revision: Annotated[
        int | None,
        typer.Option(help="Compare-and-set: the revision the weights must be at now (0: never set)"),
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, for the history")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set a model's traffic split as a new revision (aliases left out get no traffic)."""
    parsed = parse_weights(weights)

    async def work(client: RegistryClient) -> pb.AliasWeights:
        request = pb.SetAliasWeightsRequest(model_name=name, weights=parsed, reason=reason)
        if expect_revision is not None:
            request.expected_revision = expect_revision
        return (await client.unary(client.stub.SetAliasWeights, request)).weights

    entry = run_with_client(RegistryClient, "registry", address, work)
    if as_json:
        out.print_json(json.dumps(_dict(entry)))
        return
    out.print(f"{name} weights revision {entry.revision}: {_describe(entry)}", markup=False, highlight=False)


@weights_app.command("get")
def get_weights(
    name: Annotated[str, typer.Argument(help="Model name")],
    history: Annotated[bool, typer.Option("--history", help="Also list earlier revisions")] = False,
    limit: Annotated[int, typer.Option(help="Most history entries to show")] = 20,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a model's traffic split now (alias, version, weight, share), and optionally its history."""

    async def work(client: RegistryClient) -> tuple[pb.GetAliasWeightsResponse, list[pb.AliasWeights]]:
        now = await client.unary(client.stub.GetAliasWeights, pb.GetAliasWeightsRequest(model_name=name))
        earlier: list[pb.AliasWeights] = []
        if history:
            request = pb.ListAliasWeightsHistoryRequest(model_name=name, page_size=max(1, min(limit, 1000)))
            earlier = list((await client.unary(client.stub.ListAliasWeightsHistory, request)).entries)
        return now, earlier

    now, earlier = run_with_client(RegistryClient, "registry", address, work)
    if as_json:
        out.print_json(json.dumps({**_dict(now), "history": [_dict(e) for e in earlier]}))
        return
    weights = now.weights
    total = sum(weights.weights.values())
    title = f"{name}: weights revision {weights.revision}" + (
        f" set by {weights.set_by} at {weights.set_at.ToDatetime():%Y-%m-%d %H:%M:%S}"
        if weights.revision
        else ""
    )
    table = Table(title=title)
    for column in ("alias", "version", "weight", "share"):
        table.add_column(column)
    for alias in sorted(set(now.alias_versions) | set(weights.weights)):
        weight = weights.weights.get(alias)
        version = now.alias_versions.get(alias)
        table.add_row(
            alias,
            str(version) if version is not None else "(missing)",
            "" if weight is None else str(weight),
            f"{100 * weight / total:.1f}%" if weight is not None and total else "",
        )
    out.print(table)
    if history:
        log = Table(title="history (newest first)")
        for column in ("revision", "weights", "previous", "by", "at", "reason"):
            log.add_column(column)
        for entry in earlier:
            previous = ", ".join(f"{a}={w}" for a, w in sorted(entry.previous_weights.items()))
            log.add_row(
                str(entry.revision),
                _describe(entry),
                previous,
                entry.set_by,
                f"{entry.set_at.ToDatetime():%Y-%m-%d %H:%M:%S}",
                entry.reason,
            )
        out.print(log)
