"""The ``llmops`` command: start services and drive the platform from a terminal."""

from __future__ import annotations

import asyncio
import importlib
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llmops import __version__

app = typer.Typer(name="llmops", help="Kubernetes-native LLMOps platform.", no_args_is_help=True)
console = Console(stderr=True)

#: Modules that add their commands to ``llmops`` through ``register(app)`` when they are installed
#: (each service issue brings its own: ``llmops models ...``, ``llmops train ...``, ``llmops generate``).
COMMAND_MODULES = (
    "llmops.registry.cli",
    "llmops.registry.rollouts_cli",
    "llmops.training.cli",
    "llmops.quantization.cli",
    "llmops.serving.cli",
    "llmops.cache.cli",
    "llmops.stack.cli",
    "llmops.stack.fleet",
    "llmops.common.auth_cli",
)


def _register_command_modules() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that service is not part of this build
            raise
        module.register(app)


@app.command()
def version() -> None:
    """Print the llmops version."""
    typer.echo(__version__)


@app.command()
def probe(
    service: Annotated[str, typer.Option(help="Health service name; empty: the process (liveness)")] = "",
    address: Annotated[str, typer.Option(help="host:port of the gRPC server")] = "localhost:50051",
    timeout: Annotated[float, typer.Option(help="Seconds before the probe fails")] = 3.0,
) -> None:
    """Exit 0 when grpc.health.v1 reports SERVING (Kubernetes' exec probe when the server speaks TLS).

    TLS and the client certificate come from LLMOPS_TLS_CA_FILE / _CERT_FILE / _KEY_FILE, as for
    every client; the server's certificate must name the host in ``address`` (e.g. ``localhost``).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llmops.common.clients import open_channel

    async def check() -> int:
        async with open_channel(address) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            answer = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
            return int(answer.status)

    try:
        status = asyncio.run(check())
    except grpc.aio.AioRpcError as exc:
        console.print(f"not serving: {exc.code().name}: {exc.details()}", highlight=False)
        raise typer.Exit(1) from None
    if status != health_pb2.HealthCheckResponse.SERVING:
        console.print(f"not serving: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")  # type: ignore[arg-type]
        raise typer.Exit(1)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="registry | training | quantization | serving | cache")],
    port: Annotated[
        int | None, typer.Option(help="gRPC port (0 picks a free one); default from settings")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="/metrics port (0 picks a free one); default from settings")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind; default from settings")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML settings file (else LLMOPS_CONFIG_FILE)")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="serving only: model to load at start (name@alias, name:version or a folder)"),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Parse the arguments, environment and settings file, build the service without binding "
            "ports or loading models, then exit: 0 when it would start, 2 with what is wrong",
        ),
    ] = False,
) -> None:
    """Run one service until SIGTERM, then drain in-flight calls and stop."""
    from llmops.common.app import ServiceNotAvailable, check_app, load_app_factory, run_app
    from llmops.common.logging import configure_logging
    from llmops.common.settings import Settings, SettingsError

    if model is not None:
        if service != "serving":
            console.print("[red]error:[/red] --model applies to the serving service only", highlight=False)
            raise typer.Exit(2)
        os.environ["LLMOPS_SERVING_MODEL"] = model
    try:
        settings = Settings.load(config_file=config)
    except SettingsError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    try:
        factory = load_app_factory(service)
    except ServiceNotAvailable as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    if check:
        try:
            hosted = asyncio.run(check_app(factory, settings))
        except Exception as exc:  # any refusal of the graph is the answer the check exists to give
            console.print(f"[red]error:[/red] {service}: {type(exc).__name__}: {exc}", highlight=False)
            raise typer.Exit(2) from None
        typer.echo(f"llmops {service}: settings and app graph OK ({', '.join(hosted)})")
        if service == "serving" and settings.serving.faults.enabled:
            typer.echo(
                f"WARNING: fault injection is on (serving.faults): {settings.serving.faults.describe()}"
            )
        return
    configure_logging(settings.log_level, settings.log_format)
    section = settings.section(service)  # type: ignore[arg-type]
    bind_host = host or settings.host
    grpc_port = section.port if port is None else port
    http_port = section.metrics_port if metrics_port is None else metrics_port

    def announce(server: object) -> None:
        from llmops.common.server import LLMOpsServer

        assert isinstance(server, LLMOpsServer)
        # One parseable line on stdout: scripts and tests read the bound ports from it.
        print(f"llmops {service} listening grpc={server.port} metrics={server.metrics_http_port}", flush=True)

    asyncio.run(
        run_app(
            factory, settings, host=bind_host, port=grpc_port, metrics_port=http_port, on_started=announce
        )
    )


_register_command_modules()


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
