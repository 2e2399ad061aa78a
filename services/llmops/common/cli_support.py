"""What every ``llmops`` sub-command that talks to a service needs: its address and a client call.

Failures end the command with a one-line message on stderr: bad settings exit 2, an error status
from the service exits 1 (``NOT_FOUND: no model 'x'``), never a stack trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from llmops.common.errors import LLMOpsError
from llmops.common.settings import ServiceName

ClientT = TypeVar("ClientT")
T = TypeVar("T")

err = Console(stderr=True)


def resolve_address(service: ServiceName, address: str | None) -> str:
    """``address`` when given, else the service's address from settings (``LLMOPS_<SERVICE>_ADDRESS``)."""
    if address:
        return address
    from llmops.common.settings import Settings, SettingsError

    try:
        return Settings.load().section(service).address
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def run_with_client(
    client_type: Any,
    service: ServiceName,
    address: str | None,
    work: Callable[[ClientT], Awaitable[T]],
    *,
    timeout: float | None = 30.0,
) -> T:
    """Connect a ``client_type`` (a :class:`~llmops.common.clients.ServiceClient`) and run ``work``."""

    async def main() -> T:
        async with client_type.connect(resolve_address(service, address), timeout=timeout) as client:
            return await work(client)

    try:
        return asyncio.run(main())
    except LLMOpsError as exc:
        err.print(f"[red]error:[/red] {exc.code.name}: {escape(exc.message)}", highlight=False)
        raise typer.Exit(1) from None


def job_state_name(value: int) -> str:
    """``JOB_STATE_RUNNING`` -> ``running``."""
    from llmops.proto.common.v1 import job_pb2

    return job_pb2.JobState.Name(value).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def print_json(console: Console, message: Any) -> None:
    """A proto message as JSON with the proto's field names."""
    import json

    from google.protobuf import json_format

    console.print_json(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True)))
