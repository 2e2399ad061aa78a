"""``llmops up | status | down``: the embedded stack on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmops.stack.stack import (
    LocalStack,
    StackError,
    options_from_settings,
    read_state,
    running_state,
    status,
)

out = Console()
err = Console(stderr=True)
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="State folder (default: settings' data_dir)")
]


def register(app: typer.Typer) -> None:
    """Add ``up``, ``status`` and ``down`` to the ``llmops`` command."""
    app.command("up")(up)
    app.command("status")(show_status)
    app.command("down")(down)


def _settings(data_dir: Path | None) -> object:
    from llmops.common.settings import Settings, SettingsError

    if data_dir is not None:
        os.environ["LLMOPS_DATA_DIR"] = str(data_dir)
    try:
        return Settings.load()
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def up(
    data_dir: DataDirOption = None,
    free_ports: Annotated[
        bool, typer.Option("--free-ports", help="Free ports instead of the settings' ports")
    ] = False,
    engine: Annotated[str, typer.Option(help="Serving engine: vllm | transformers")] = "",
    prometheus: Annotated[bool, typer.Option("--prometheus/--no-prometheus")] = True,
    mlflow_ui: Annotated[bool, typer.Option("--mlflow-ui/--no-mlflow-ui")] = True,
) -> None:
    """Start the embedded stack: Redis, the five services (training with a local Ray), Prometheus, MLflow UI."""
    settings = _settings(data_dir)
    env = {"LLMOPS_SERVING_ENGINE": engine} if engine else {}
    options = options_from_settings(
        settings, free_ports=free_ports, env=env, prometheus=prometheus, mlflow_ui=mlflow_ui
    )
    with err.status("starting the stack...") as spinner:
        stack = LocalStack(options, progress=lambda line: spinner.update(line))
        try:
            state = stack.up()
        except StackError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
    out.print(_table(status(state)))
    out.print(f"stop it with [bold]llmops down --data-dir {state.data_dir}[/bold]")


def show_status(data_dir: DataDirOption = None) -> None:
    """What runs where, and whether each part answers."""
    settings = _settings(data_dir)
    folder = Path(settings.data_dir).expanduser().absolute()  # type: ignore[attr-defined]
    state = read_state(folder)
    if state is None:
        out.print(f"no stack recorded in {folder}")
        raise typer.Exit(1)
    rows = status(state)
    out.print(_table(rows))
    if running_state(folder) is None:
        raise typer.Exit(1)


def down(data_dir: DataDirOption = None) -> None:
    """Stop the stack cleanly (services drain first)."""
    settings = _settings(data_dir)
    options = options_from_settings(settings)
    stopped = LocalStack(options).down()
    out.print(f"stopped {', '.join(stopped)}" if stopped else "no stack was running")


def _table(rows: list[dict[str, object]]) -> Table:
    table = Table(title="llmops stack")
    for column in ("part", "pid", "health", "address", "metrics / url", "log"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["name"]),
            str(row["pid"]),
            str(row["health"]),
            str(row["address"]),
            str(row["metrics"] or row["url"]),
            str(row["log"]),
        )
    return table
