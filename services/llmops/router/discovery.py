"""Where the replicas are: a static list, a headless Service's DNS name, or Kubernetes EndpointSlices.

Each discoverer runs as a task and calls :meth:`EndpointPool.set_addresses` with the full set it
sees; the pool starts and stops the replicas' watchers. Readiness is the pool's business (health
and load streams), so discovery may list a replica that is still starting.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import socket

from llmops.router.endpoints import EndpointPool

log = logging.getLogger(__name__)


class Discovery(abc.ABC):
    """Finds replicas and keeps the pool's list of them current."""

    name: str

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Publish the first list (or start watching for one)."""
        self._task = asyncio.create_task(self.run(), name=f"router-discovery-{self.name}")

    @abc.abstractmethod
    async def run(self) -> None:
        """Keep the pool's addresses of this source current until cancelled."""

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class StaticDiscovery(Discovery):
    """A fixed list of host:port (the embedded stack, tests)."""

    name = "static"

    def __init__(self, pool: EndpointPool, addresses: list[str]) -> None:
        super().__init__(pool)
        self.addresses = addresses

    async def start(self) -> None:
        self.pool.set_addresses(self.addresses, self.name)

    async def run(self) -> None:  # pragma: no cover - nothing to watch
        return


class DnsDiscovery(Discovery):
    """Each address a headless Service's name resolves to is a replica; resolved every few seconds."""

    name = "dns"

    def __init__(self, pool: EndpointPool, host: str, port: int, refresh_seconds: float) -> None:
        super().__init__(pool)
        self.host, self.port, self.refresh = host, port, refresh_seconds

    async def resolve(self) -> set[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        found = set()
        for family, _, _, _, address in infos:
            host = str(address[0])
            found.add(f"[{host}]:{self.port}" if family == socket.AF_INET6 else f"{host}:{self.port}")
        return found

    async def run(self) -> None:
        while True:
            try:
                self.pool.set_addresses(await self.resolve(), self.name)
            except OSError as exc:  # NXDOMAIN while the Service has no ready pod: keep the last list
                log.warning("cannot resolve %s: %s", self.host, exc)
            await asyncio.sleep(self.refresh)
