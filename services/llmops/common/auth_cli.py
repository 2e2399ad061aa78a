"""``llmops auth new-key``: make an API key and the keys-file entry that admits it."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml
from rich.console import Console

from llmops.common.auth import Role, key_entry, new_key

auth = typer.Typer(help="API keys for the platform's services.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.add_typer(auth, name="auth")


@auth.command("new-key")
def new_key_command(
    key_id: Annotated[str, typer.Option("--id", help="Name shown in logs and job records (a-z, 0-9, . _ -)")],
    tenant: Annotated[str, typer.Option(help="Tenant: cache entries and rate limits are per tenant")],
    role: Annotated[Role, typer.Option(help="user: generate and read; admin: everything")] = Role.USER,
) -> None:
    """Print a new key (shown once: store it in the caller's secret) and its keys-file entry (hash only)."""
    key = new_key()
    entry = key_entry(key, key_id, tenant, role)
    err.print("[bold]API key[/bold] (give it to the caller; it is not stored anywhere):", highlight=False)
    out.print(key, highlight=False, soft_wrap=True)
    err.print("[bold]keys-file entry[/bold] (append under keys:):", highlight=False)
    out.print(yaml.safe_dump([entry], sort_keys=False).rstrip(), highlight=False, soft_wrap=True)
