"""``llmops up | status | down``: the embedded stack on this machine."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

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
if not out.is_terminal:  # logs and CI: wide enough that tables keep their columns
    out = Console(width=180)
err = Console(stderr=True)
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="State folder (default: settings' data_dir)")
]


def register(app: typer.Typer) -> None:
    """Add ``up``, ``status`` and ``down`` to the ``llmops`` command."""
    app.command("up")(up)
    app.command("status")(show_status)
    app.command("down")(down)
    app.command("demo")(demo)
    app.command("dashboards")(check_dashboards)


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
    serving_replicas: Annotated[
        int,
        typer.Option(
            "--serving-replicas", min=1, help="Serving replicas; more than 1 puts the router in front"
        ),
    ] = 1,
    scale_to_zero_after: Annotated[
        float | None,
        typer.Option(
            "--scale-to-zero-after",
            min=0.1,
            help="Stop serving after this many seconds without traffic and start it again when a request "
            "waits in the router (needs a start-up model: LLMOPS_SERVING_MODEL); off unless given",
        ),
    ] = None,
    pool: Annotated[
        list[str] | None,
        typer.Option(
            "--pool",
            help="A serving pool NAME=REPLICAS following the alias NAME of the pool model (repeatable: "
            "--pool champion=2 --pool challenger=1); replaces --serving-replicas, router in front",
        ),
    ] = None,
    pool_model: Annotated[
        str, typer.Option("--pool-model", help="Registry model the pools serve (default: serving.model's)")
    ] = "",
) -> None:
    """Start the embedded stack: Redis, the services (training with a local Ray), Prometheus, MLflow UI."""
    settings = _settings(data_dir)
    from llmops.common.errors import InvalidArgument
    from llmops.stack.fleet import parse_pools, pool_model_name

    try:
        pools = parse_pools(pool or [])
        if pools:
            pool_model = pool_model_name(settings.serving.model, pool_model)  # type: ignore[attr-defined]
    except InvalidArgument as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(2) from None
    env = {"LLMOPS_SERVING_ENGINE": engine} if engine else {}
    options = options_from_settings(
        settings,
        free_ports=free_ports,
        env=env,
        prometheus=prometheus,
        mlflow_ui=mlflow_ui,
        detached=True,
        serving_replicas=serving_replicas,
        scale_to_zero_after=scale_to_zero_after,
        pools=pools,
        pool_model=pool_model,
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


def demo(
    fast: Annotated[
        bool, typer.Option("--fast", help="The tiny model instead of SmolLM2-135M-Instruct")
    ] = False,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Leave the stack up at the end")
    ] = False,
    data_dir: DataDirOption = None,
    pipeline_dir: Annotated[Path, typer.Option(help="The DVC pipeline folder (data repository)")] = Path(
        "pipelines"
    ),
    engine: Annotated[
        str,
        typer.Option(
            help="Serving engine for the champion: transformers | vllm (default: the one the promotion "
            "names for its format)"
        ),
    ] = "",
) -> None:
    """The whole loop: stack up, base import, DVC pipeline (train, quantize, evaluate, speed, register, promote), serve, summary."""
    from llmops.stack.demo import DemoOptions, run_demo

    settings = _settings(data_dir)
    if not (pipeline_dir / "dvc.yaml").is_file():
        err.print(
            f"[red]error:[/red] no dvc.yaml in {pipeline_dir} (run from the repository root or pass --pipeline-dir)"
        )
        raise typer.Exit(2)
    options = DemoOptions(
        data_dir=Path(settings.data_dir),  # type: ignore[attr-defined]
        pipeline_dir=pipeline_dir.absolute(),
        fast=fast,
        keep_running=keep_running,
        engine=engine,
    )
    started = time.monotonic()
    try:
        result = run_demo(
            options, say=lambda line: err.print(f"[bold cyan]>[/bold cyan] {line}", highlight=False)
        )
    except (StackError, subprocess.CalledProcessError) as exc:
        err.print(f"[red]demo failed:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    print_summary(result, time.monotonic() - started, kept=keep_running)


def print_summary(result: Any, seconds: float, *, kept: bool) -> None:
    """Versions and lineage, eval numbers, quantization ratios, latencies, the cache hit, where to look next."""
    lineage = Table(title="the champion's lineage (newest first)")
    for column in ("version", "format", "aliases", "parent", "dataset", "commit", "MLflow run", "job"):
        lineage.add_column(column)
    for link in result.lineage:
        lineage.add_row(*(str(link[k]) for k in ("version", "format", "aliases", "parent", "dataset",
                                                  "dataset_commit", "mlflow_run", "job")))  # fmt: skip
    out.print(lineage)
    reports = result.reports
    numbers = Table(title="what the pipeline measured")
    numbers.add_column("measure")
    numbers.add_column("value", justify="right")
    evaluation, quantized, promote = reports["eval"], reports["quantize"], reports["promote"]
    speeds = reports["speed"]["variants"]
    numbers.add_row(
        "fine-tune steps / final train loss",
        f"{reports['train']['steps']} / {reports['train']['metrics'].get('train_loss', float('nan')):.3f}",
    )
    if "champion" in evaluation:
        numbers.add_row(
            f"eval perplexity, champion {evaluation['champion']['model']}",
            f"{evaluation['champion']['perplexity']:.3f}",
        )
    for variant in evaluation["variants"]:
        rate = speeds.get(variant["model"], {})
        numbers.add_row(
            f"{variant['model']} ({variant['format']}): eval perplexity, decode tok/s on {rate.get('engine', '?')}",
            f"{variant['perplexity']:.3f}, {rate.get('decode_tokens_per_second', float('nan')):.1f}",
        )
    numbers.add_row("INT8 size ratio", f"{quantized['size_ratio']:.3f}")
    numbers.add_row(
        "INT8 job: perplexity before -> after (eval.txt)",
        f"{quantized['perplexity_before']:.3f} -> {quantized['perplexity_after']:.3f}",
    )
    numbers.add_row(
        "INT8 job: tokens/s before -> after (transformers)",
        f"{quantized['tokens_per_second_before']:.1f} -> {quantized['tokens_per_second_after']:.1f}",
    )
    numbers.add_row(
        "promotion",
        f"{'yes' if promote['promoted'] else 'no'} ({promote['champion_after']} on {promote['engine']}): "
        f"{promote['reason']}",
    )
    out.print(numbers)
    requests = Table(title="requests to the champion")
    for column in ("request", "TTFT ms", "latency ms", "cache hit", "answer"):
        requests.add_column(column)
    for row in result.requests:
        ttft = f"{row['ttft_ms']:.0f}" if "ttft_ms" in row else ""
        hit = ("yes" if row["cached"] else "no") + (
            f" (try {row['tries']})" if row.get("tries", 1) > 1 else ""
        )
        requests.add_row(row["request"], ttft, f"{row['latency_ms']:.0f}", hit,
                         row["text"].strip().replace("\n", " ")[:60])  # fmt: skip
    out.print(requests)
    if result.rollouts:
        rollouts = Table(title="rollouts (challenger SLIs judged against the champion's, step by step)")
        for column in ("rollout", "case", "from -> to", "steps judged", "final state"):
            rollouts.add_column(column)
        for r in result.rollouts:
            judged = sum(t["evidence"] is not None for t in r["transitions"])
            rollouts.add_row(str(r["id"]), r["label"], f"v{r['from_version']} -> v{r['to_version']}",
                             str(judged), r["state"].upper())  # fmt: skip
        out.print(rollouts)
    state = result.state
    out.print(
        f"[bold]done in {seconds / 60:.1f} min.[/bold] Where to look next"
        + ("" if kept else " (start the stack again with `llmops up`)")
        + ":"
    )
    for part in state.parts:
        if part.name == "mlflow-ui":
            out.print(f"  MLflow UI          {part.url}")
        elif part.name == "prometheus":
            out.print(f"  Prometheus         {part.url}")
        elif part.metrics:
            out.print(f"  {part.name:<18} grpcurl -plaintext {part.address} list   |   {part.metrics}")
    out.print("  pipeline           cd pipelines && dvc dag && dvc metrics show")


def check_dashboards(
    prometheus: Annotated[str, typer.Option(help="Prometheus base URL (default: the running stack's)")] = "",
    namespace: Annotated[str, typer.Option(help="The dashboards' $namespace")] = "local",
    window: Annotated[str, typer.Option(help="What $__rate_interval and $__range become")] = "1m",
    hours: Annotated[float, typer.Option(help="The time range the panels show, in hours")] = 6.0,
    data_dir: DataDirOption = None,
) -> None:
    """Evaluate every dashboard panel and recording rule on Prometheus; exit 1 if one shows no data."""
    from llmops.stack.dashboards import evaluate, queries

    if not prometheus:
        settings = _settings(data_dir)
        state = running_state(Path(settings.data_dir).expanduser().absolute())  # type: ignore[attr-defined]
        part = state.part("prometheus") if state is not None else None
        if part is None:
            err.print("[red]error:[/red] no running stack with Prometheus: pass --prometheus URL")
            raise typer.Exit(2)
        prometheus = part.url
    outcomes = evaluate(prometheus, queries(), {"namespace": namespace}, seconds=hours * 3600, window=window)
    table = Table(title=f"dashboards and recording rules on {prometheus}")
    for column in ("where", "series", "status"):
        table.add_column(column)
    colours = {"data": "green", "cluster": "yellow", "empty": "red", "error": "red"}
    for outcome in outcomes:
        status_text = outcome.error or outcome.status
        table.add_row(
            outcome.query.where, str(outcome.series), f"[{colours[outcome.status]}]{status_text}[/]"
        )
    out.print(table)
    missing = [o for o in outcomes if o.status in ("empty", "error")]
    cluster = sum(o.status == "cluster" for o in outcomes)
    out.print(
        f"{len(outcomes) - len(missing) - cluster} of {len(outcomes)} show data; "
        f"{cluster} need a Kubernetes cluster (kube-state-metrics); {len(missing)} show nothing"
    )
    if missing:
        raise typer.Exit(1)
