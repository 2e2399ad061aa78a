"""Serving pools in the embedded stack, and ``llmops fleet status | reload``.

``llmops up --pool champion=2 --pool challenger=1`` starts, behind the router, two replicas in pool
``champion`` serving ``<model>@champion`` and one in pool ``challenger`` serving
``<model>@challenger`` (``LLMOPS_SERVING_POOL`` / ``LLMOPS_SERVING_MODEL`` per replica): each pool
follows the alias of its name, and the replicas roll one at a time when it moves
(:mod:`llmops.serving.pool`). ``<model>`` is ``--pool-model``, else the name in ``serving.model``.

``llmops fleet status`` reads the registry's pool records (per model: each pool's alias, target
version, generation, lease holder, and each live replica's version, phase and readiness) and the
alias weights the router follows; ``llmops fleet reload <model> <pool>`` bumps a pool's generation,
so each of its replicas reloads once, one at a time.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from llmops.common.errors import InvalidArgument, LLMOpsError

POOL_SPEC = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)=([0-9]+)$")
out = Console()
if not out.is_terminal:
    out = Console(width=180)
err = Console(stderr=True)


def parse_pools(specs: Sequence[str]) -> dict[str, int]:
    """``["champion=2", "challenger=1"]`` -> ``{"champion": 2, "challenger": 1}``."""
    pools: dict[str, int] = {}
    for spec in specs:
        match = POOL_SPEC.match(spec)
        if match is None or int(match.group(3)) < 1:
            raise InvalidArgument(f"--pool {spec!r}: expected NAME=REPLICAS, e.g. champion=2", field="pool")
        if match.group(1) in pools:
            raise InvalidArgument(f"--pool {match.group(1)} given twice", field="pool")
        pools[match.group(1)] = int(match.group(3))
    return pools


def pool_model_name(model: str | None, explicit: str = "") -> str:
    """The registry model the pools serve: ``explicit``, else the name in ``serving.model``."""
    name = explicit or re.split(r"[@:]", model or "", maxsplit=1)[0]
    if not name or name.startswith(("/", ".", "~")):
        raise InvalidArgument(
            "pools serve a registry model: give --pool-model or LLMOPS_SERVING_MODEL=name@alias", field="pool"
        )
    return name


def serving_parts(
    replicas: int, pools: Mapping[str, int], model: str, free_port: Any
) -> list[tuple[str, dict[str, str]]]:
    """(part name, extra env) of each serving replica: ``serving``, ``serving-2``... without pools;
    ``serving-<pool>-<n>`` in pool ``<pool>`` serving ``<model>@<pool>`` with them."""
    if not pools:
        return [
            ("serving" if i == 0 else f"serving-{i + 1}", {} if i == 0 else {"LLMOPS_SERVING_HTTP_PORT": str(free_port())})
            for i in range(replicas)
        ]  # fmt: skip
    parts = []
    for pool, count in pools.items():
        for i in range(count):
            env = {
                "LLMOPS_SERVING_POOL": pool,
                "LLMOPS_SERVING_MODEL": f"{model}@{pool}",
                "LLMOPS_SERVING_HTTP_PORT": str(free_port()),
            }
            parts.append((f"serving-{pool}-{i + 1}", env))
    return parts


# --- llmops fleet ---------------------------------------------------------------------------------

_PHASES = {0: "-", 1: "starting", 2: "ready", 3: "waiting", 4: "draining", 5: "unloading", 6: "loading",
           7: "failed", 8: "idle"}  # fmt: skip


async def fleet_status(registry_address: str, model: str = "") -> list[dict[str, Any]]:
    """Per model: pools with target, replicas, and the alias weights (the router follows them)."""
    from llmops.common.clients import FleetClient, RegistryClient
    from llmops.proto.registry.v1 import fleet_service_pb2 as fpb

    pools: list[Any] = []
    async with FleetClient.connect(registry_address, timeout=10) as fleet:
        token = ""
        while True:
            listed = await fleet.unary(
                fleet.stub.ListPools,
                fpb.ListPoolsRequest(model_name=model, page_size=1000, page_token=token),
            )
            pools.extend(listed.pools)
            token = listed.next_page_token
            if not token:
                break
    models: dict[str, dict[str, Any]] = {}
    for pool in pools:
        entry = models.setdefault(pool.model_name, {"model": pool.model_name, "pools": [], "weights": {}})
        members = [
            {
                "replica": m.replica_id,
                "version": m.version,
                "phase": _PHASES.get(m.phase, str(m.phase)),
                "serving": m.serving,
                "generation": m.generation,
            }
            for m in pool.members
        ]
        entry["pools"].append(
            {
                "pool": pool.pool,
                "alias": pool.alias if pool.HasField("alias") else "",
                "pinned": pool.version if pool.HasField("version") else 0,
                "target_version": pool.target_version,
                "generation": pool.generation,
                "lease_holder": pool.lease.holder,
                "ready": sum(1 for m in pool.members if m.serving and m.version == pool.target_version),
                "total": len(members),
                "replicas": members,
            }
        )
    async with RegistryClient.connect(registry_address, timeout=10) as registry:
        for name, entry in models.items():
            split = await registry.get_alias_weights(name)
            entry["weights"] = dict(split.weights)
            entry["weights_revision"] = split.revision
    return list(models.values())


async def fleet_reload(registry_address: str, model: str, pool: str) -> dict[str, Any]:
    from llmops.common.clients import FleetClient
    from llmops.proto.registry.v1 import fleet_service_pb2 as fpb

    async with FleetClient.connect(registry_address, timeout=10) as fleet:
        answer = await fleet.unary(fleet.stub.ReloadPool, fpb.ReloadPoolRequest(model_name=model, pool=pool))
    return {
        "model": model,
        "pool": pool,
        "generation": answer.pool.generation,
        "replicas": len(answer.pool.members),
    }


def _registry_address(address: str) -> str:
    if address:
        return address
    from llmops.common.settings import Settings

    return Settings.load().registry.address


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except LLMOpsError as exc:
        err.print(f"[red]error:[/red] {exc.code.name}: {exc.message}", highlight=False)
        raise typer.Exit(2 if exc.code.name in ("INVALID_ARGUMENT", "NOT_FOUND") else 1) from None


AddressOption = Annotated[str, typer.Option("--registry", help="Registry address (default: settings)")]
fleet_app = typer.Typer(help="Serving pools: what each serves, and rolling reloads.", no_args_is_help=True)


@fleet_app.command("status")
def status_command(
    model: Annotated[str, typer.Argument(help="Only this model")] = "",
    registry: AddressOption = "",
    json_output: Annotated[bool, typer.Option("--json", help="JSON instead of tables")] = False,
) -> None:
    """Per model: each pool's alias, target version, replicas ready/total with version and phase, and weights."""
    models = _run(fleet_status(_registry_address(registry), model))
    if json_output:
        import json

        out.print_json(json.dumps(models))
        return
    if not models:
        out.print("no serving pools recorded")
    for entry in models:
        weights = ", ".join(f"{a} {w}" for a, w in sorted(entry["weights"].items())) or "none (no split)"
        table = Table(title=f"{entry['model']}  (router weights: {weights})")
        for column in ("pool", "follows", "target", "gen", "ready", "replica", "version", "phase", "serving"):
            table.add_column(column)
        for pool in entry["pools"]:
            follows = f"@{pool['alias']}" if pool["alias"] else f"v{pool['pinned']} (pinned)"
            head = [pool["pool"], follows, str(pool["target_version"] or "-"), str(pool["generation"]),
                    f"{pool['ready']}/{pool['total']}"]  # fmt: skip
            for i, m in enumerate(pool["replicas"] or [None]):
                cells = head if i == 0 else [""] * len(head)
                if m is None:
                    table.add_row(*cells, "-", "-", "-", "-")
                else:
                    table.add_row(
                        *cells,
                        m["replica"],
                        str(m["version"] or "-"),
                        m["phase"],
                        "yes" if m["serving"] else "no",
                    )
        out.print(table)


@fleet_app.command("reload")
def reload_command(
    model: Annotated[str, typer.Argument(help="The model")],
    pool: Annotated[str, typer.Argument(help="The pool to roll")],
    registry: AddressOption = "",
) -> None:
    """Roll a pool: each replica reloads once, one at a time (the pool's generation + 1)."""
    answer = _run(fleet_reload(_registry_address(registry), model, pool))
    out.print(
        f"pool {answer['pool']} of {answer['model']}: generation {answer['generation']}; "
        f"its {answer['replicas']} replicas reload one at a time"
    )


def register(app: typer.Typer) -> None:
    """Add ``llmops fleet`` to the ``llmops`` command."""
    app.add_typer(fleet_app, name="fleet")
