"""How a service plugs into the runtime: ``llmops.<service>.app.build_app(settings, registry)``.

Each service package provides a ``build_app`` that wires its graph (stores, backends, clients) from
settings and returns a :class:`ServiceApp`. :func:`run_app` hosts one on a server until SIGTERM.
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry

from llmops.common.access import Access
from llmops.common.checking import building_only
from llmops.common.clients import ClientSecurity, configure_clients
from llmops.common.server import LLMOpsServer, ServiceBinding, create_server
from llmops.common.settings import SERVICE_NAMES, ServiceName, Settings

log = logging.getLogger(__name__)


class ServiceApp(abc.ABC):
    """A wired service, ready to be hosted."""

    @abc.abstractmethod
    def bindings(self) -> Sequence[ServiceBinding]:
        """The gRPC services this app hosts."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect to dependencies, load models. Runs after the port is bound, before readiness."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources after the server has drained."""

    def access(self) -> Access | None:
        """The API keys and rate limiter the app already uses (for an API of its own), which the
        gRPC runtime then shares; ``None``: the runtime builds its own."""
        return None


AppFactory = Callable[[Settings, CollectorRegistry], ServiceApp]


class ServiceNotAvailable(LookupError):
    """The named service is not part of this build."""


def load_app_factory(service: str) -> AppFactory:
    """Find ``build_app`` of ``llmops.<service>.app``."""
    if service not in SERVICE_NAMES:
        raise ServiceNotAvailable(f"unknown service {service!r}; choose one of {', '.join(SERVICE_NAMES)}")
    module_name = f"llmops.{service}.app"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ServiceNotAvailable(f"the {service} service is not part of this build yet") from None
        raise
    factory: AppFactory = module.build_app
    return factory


async def start_app(
    factory: AppFactory,
    settings: Settings,
    *,
    host: str,
    port: int,
    metrics_port: int | None,
) -> tuple[LLMOpsServer, ServiceApp]:
    """Build an app, bind its server, then run its start hook."""
    registry = CollectorRegistry()
    app = factory(settings, registry)
    server, _ = await create_server(
        f"{host}:{port}",
        app.bindings(),
        settings,
        registry=registry,
        metrics_port=metrics_port,
        access=app.access(),
    )
    try:
        await app.start()
    except BaseException:
        await server.stop(0)
        await app.close()
        raise
    await server.refresh_readiness()
    return server, app


async def check_app(factory: AppFactory, settings: Settings) -> list[str]:
    """Build an app as ``run_app`` would, without binding a port or starting it, then close it.

    Checks what start-up would otherwise find first: the server's and the clients' TLS files, and
    the app graph itself (each ``build_app`` refuses settings it cannot work with). Returns the
    gRPC services the app would host.

    Raises:
        Exception: whatever the settings or the graph refuse, with its message.
    """
    from llmops.common.server import server_credentials

    server_credentials(settings)
    ClientSecurity.from_settings(settings)
    with building_only():
        app = factory(settings, CollectorRegistry())
    try:
        return [binding.name for binding in app.bindings()]
    finally:
        await app.close()


async def run_app(
    factory: AppFactory,
    settings: Settings,
    *,
    host: str,
    port: int,
    metrics_port: int | None,
    on_started: Callable[[LLMOpsServer], None] | None = None,
) -> None:
    """Host an app until SIGTERM/SIGINT, then drain and close it.

    The process's clients (calls to other services) send ``settings.api_key`` and use its TLS files.
    """
    configure_clients(ClientSecurity.from_settings(settings))
    server, app = await start_app(factory, settings, host=host, port=port, metrics_port=metrics_port)
    server.install_signal_handlers()
    if on_started is not None:
        on_started(server)
    try:
        await server.wait_for_termination()
    finally:
        await app.close()
        log.info("stopped")


__all__ = [
    "AppFactory",
    "ServiceApp",
    "ServiceName",
    "ServiceNotAvailable",
    "check_app",
    "load_app_factory",
    "run_app",
    "start_app",
]
