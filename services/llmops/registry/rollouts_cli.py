"""``llmops rollout start|status|pause|resume|abort``: canary rollouts through the registry's RolloutService.

llmops rollout start llm 7 --steps 5,25,50,100 --step-seconds 60 --ttft-p95-ratio 1.2 --watch
llmops rollout status llm --watch      # live: step, weights, each SLO against its bound
llmops rollout pause 3 --reason "looking at the logs"; llmops rollout resume 3; llmops rollout abort 3
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmops.common.cli_support import run_with_client
from llmops.common.rollout_client import RolloutClient
from llmops.common.rollouts import SLIS, Rollout, RolloutSpec, SloBound, Slos

rollout_app = typer.Typer(
    name="rollout",
    help="Canary rollouts: traffic steps gated on TTFT, inter-token latency and error SLOs, promoted or rolled back.",
    no_args_is_help=True,
)
out = Console()

AddressOption = Annotated[
    str | None, typer.Option("--address", help="Registry host:port; default from settings (registry.address)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]
WatchOption = Annotated[bool, typer.Option("--watch", help="Follow the rollout live until it ends")]


def parse_steps(text: str) -> tuple[int, ...]:
    """``"5,25,50,100"`` as a tuple; ``typer.BadParameter`` for anything else (the server checks the rest)."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"steps are percents separated by commas, got {text!r}") from None


def _slos(values: dict[str, tuple[float, float]]) -> Slos | None:
    if not any(v for pair in values.values() for v in pair):
        return None  # the registry's defaults
    return Slos(**{sli: SloBound(*pair) for sli, pair in values.items()})


def _pct(value: float, sli: str) -> str:
    if sli == "error_ratio":
        return f"{100 * value:.2f}%"
    return f"{1000 * value:.1f} ms"


def render(rollout: Rollout) -> Group:
    """The live view: header, weights, each SLO of the latest judged window against its bounds."""
    spec = rollout.spec
    steps = " ".join(
        f"[bold]{s}%[/bold]" if i == rollout.step_index else f"{s}%" for i, s in enumerate(spec.steps)
    )
    head = Text.from_markup(
        f"rollout [bold]{rollout.id}[/bold]  {spec.model_name}  v{rollout.from_version} -> v{spec.to_version}  "
        f"[bold]{rollout.state.value}[/bold]  step {rollout.step_index + 1}/{len(spec.steps)}: {steps}\n"
        f"weights: champion {100 - rollout.challenger_percent} / challenger {rollout.challenger_percent}   "
        f"step: >= {spec.step_min_seconds:g} s and >= {spec.step_min_requests} challenger requests"
    )
    judged = next((t.evidence for t in reversed(rollout.transitions) if t.evidence is not None), None)
    table = Table(title="SLOs (latest judged window)" if judged else "SLOs (no window judged yet)")
    for column in (
        "SLI",
        "bound",
        f"champion v{rollout.from_version}",
        f"challenger v{spec.to_version}",
        "met",
    ):
        table.add_column(column)
    checks = {c.sli: c for c in judged.checks} if judged else {}
    for sli in SLIS:
        bound = rollout.slos.bound(sli)
        if not bound.set:
            continue
        limits = []
        if bound.max_value:
            limits.append(f"<= {_pct(bound.max_value, sli)}")
        if bound.max_ratio:
            limits.append(f"<= {bound.max_ratio:g}x champion")
        check = checks.get(sli)
        if check is None:
            table.add_row(sli, ", ".join(limits), "-", "-", "-")
            continue
        mark = "[green]yes[/green]" if check.met else "[red]NO[/red]"
        table.add_row(
            sli, ", ".join(limits), _pct(check.champion_value, sli), _pct(check.challenger_value, sli), mark
        )
    if judged:
        table.caption = (
            f"{judged.source}, {judged.window_seconds:.1f} s: requests {judged.champion.requests} / "
            f"{judged.challenger.requests}, errors {judged.champion.errors} / {judged.challenger.errors}"
        )
    history = Table(title="transitions")
    for column in ("at", "state", "step", "challenger %", "by", "why"):
        history.add_column(column)
    for t in rollout.transitions[-8:]:
        history.add_row(
            t.at.strftime("%H:%M:%S"),
            t.to_state.value,
            str(t.step_index),
            str(t.challenger_percent),
            t.by,
            t.reason,
        )
    return Group(head, table, history)


def _as_dict(rollout: Rollout) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(asdict(rollout), default=str))
    return data


def _show(rollout: Rollout, as_json: bool) -> None:
    if as_json:
        out.print_json(data=_as_dict(rollout))
    else:
        out.print(render(rollout))


async def _watch(client: RolloutClient, rollout: Rollout, interval: float) -> Rollout:
    with Live(render(rollout), console=out, refresh_per_second=4) as live:
        while rollout.state.active:
            await asyncio.sleep(interval)
            rollout = await client.get(rollout.id)
            live.update(render(rollout))
    return rollout


@rollout_app.command("start")
def start(
    model: Annotated[str, typer.Argument(help="Model name")],
    version: Annotated[int, typer.Argument(help="Version to roll out (the champion is the starting point)")],
    steps: Annotated[
        str, typer.Option(help="Challenger percent per step, rising, ending at 100")
    ] = "5,25,50,100",
    step_seconds: Annotated[float, typer.Option(help="Minimum seconds per step (0: 60)")] = 0.0,
    step_requests: Annotated[int, typer.Option(help="Minimum challenger requests per step (0: 50)")] = 0,
    ttft_p95_max: Annotated[float, typer.Option(help="TTFT p95 bound, seconds (0: none)")] = 0.0,
    ttft_p95_ratio: Annotated[
        float, typer.Option(help="TTFT p95 at most this x the champion's (0: none)")
    ] = 0.0,
    itl_p95_max: Annotated[float, typer.Option(help="Inter-token p95 bound, seconds (0: none)")] = 0.0,
    itl_p95_ratio: Annotated[float, typer.Option(help="Inter-token p95 at most this x the champion's")] = 0.0,
    error_ratio_max: Annotated[float, typer.Option(help="Error ratio bound in [0, 1] (0: none)")] = 0.0,
    error_ratio_ratio: Annotated[float, typer.Option(help="Error ratio at most this x the champion's")] = 0.0,
    reason: Annotated[str, typer.Option(help="Why, for the record")] = "",
    watch: WatchOption = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch")] = 1.0,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a rollout from the model's champion to VERSION. No SLO option: the registry's defaults
    (TTFT and inter-token p95 <= 1.25x the champion's, errors <= 5% and <= 2x the champion's)."""
    slos = _slos(
        {
            "ttft_p95_seconds": (ttft_p95_max, ttft_p95_ratio),
            "inter_token_p95_seconds": (itl_p95_max, itl_p95_ratio),
            "error_ratio": (error_ratio_max, error_ratio_ratio),
        }
    )
    spec = RolloutSpec(model, version, parse_steps(steps), step_seconds, step_requests, slos, reason)

    async def work(client: RolloutClient) -> Rollout:
        rollout = await client.start(spec)
        return await _watch(client, rollout, interval) if watch else rollout

    rollout = run_with_client(RolloutClient, "registry", address, work, timeout=30.0)
    if not watch or as_json:  # --watch has shown it live
        _show(rollout, as_json)


@rollout_app.command("status")
def status(
    model: Annotated[str, typer.Argument(help="Model name (its newest rollout)")] = "",
    rollout_id: Annotated[int, typer.Option("--id", help="A rollout by id instead")] = 0,
    watch: WatchOption = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch")] = 1.0,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a rollout: step, weights, each SLO against its bound for both versions, transitions."""
    if not model and not rollout_id:
        raise typer.BadParameter("name a model or pass --id")

    async def work(client: RolloutClient) -> Rollout:
        rollout = await client.get(rollout_id, model_name=model)
        return await _watch(client, rollout, interval) if watch else rollout

    rollout = run_with_client(RolloutClient, "registry", address, work, timeout=30.0)
    if not watch or as_json:  # --watch has shown it live
        _show(rollout, as_json)


def _change(action: str, rollout_id: int, reason: str, address: str | None, as_json: bool) -> None:
    async def work(client: RolloutClient) -> Rollout:
        method = getattr(client, action)
        rollout: Rollout = await method(rollout_id, reason=reason)
        return rollout

    _show(run_with_client(RolloutClient, "registry", address, work), as_json)


@rollout_app.command("pause")
def pause(
    rollout_id: Annotated[int, typer.Argument(help="Rollout id")],
    reason: Annotated[str, typer.Option(help="Why")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Freeze a rollout at its step (its weights stay)."""
    _change("pause", rollout_id, reason, address, as_json)


@rollout_app.command("resume")
def resume(
    rollout_id: Annotated[int, typer.Argument(help="Rollout id")],
    reason: Annotated[str, typer.Option(help="Why")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resume a paused rollout (its step's window starts again)."""
    _change("resume", rollout_id, reason, address, as_json)


@rollout_app.command("abort")
def abort(
    rollout_id: Annotated[int, typer.Argument(help="Rollout id")],
    reason: Annotated[str, typer.Option(help="Why")] = "",
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """End a rollout: challenger weight 0, champion untouched."""
    _change("abort", rollout_id, reason, address, as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(rollout_app, name="rollout")
