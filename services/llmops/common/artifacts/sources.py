"""Where a job's source model comes from: :class:`ModelSource` and a local-folder implementation.

The local layout is the one :class:`~llmops.common.artifacts.sinks.LocalDirectorySink` writes
(``<root>/<name>/<version>/``), so a result registered locally can be quantized again (and is then
refused as already quantized). :class:`RegistryModelSource` resolves through the registry service and
downloads the version's files through ``RegistryClient`` into a local cache.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import shutil
import uuid
from pathlib import Path

from llmops.common.errors import InvalidArgument, NotFound


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    name: str
    version: int
    path: Path


class ModelSource(abc.ABC):
    """Resolves a model reference to a local folder in Hugging Face layout."""

    #: Field that bad names are reported under (``spec.base_model`` for training).
    field = "spec.source"

    @abc.abstractmethod
    def resolve(self, name: str, version: int | None = None, alias: str | None = None) -> ResolvedSource:
        """The folder of ``name`` at ``version`` (latest when neither version nor alias is given).

        Raises:
            NotFound: no such model or version.
        """


class LocalModelSource(ModelSource):
    """Versions as numbered folders under ``root``; aliases are not supported locally."""

    def __init__(self, root: Path, field: str = "spec.source") -> None:
        self._root = root
        self.field = field

    def resolve(self, name: str, version: int | None = None, alias: str | None = None) -> ResolvedSource:
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgument("a model name without '/'", field=f"{self.field}.name")
        if alias:
            raise InvalidArgument(
                "the local model source has no aliases; give a version", field=f"{self.field}.alias"
            )
        folder = self._root / name
        versions = (
            sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
        )
        if not versions:
            raise NotFound(f"model {name} does not exist")
        chosen = version or versions[-1]
        if chosen not in versions:
            raise NotFound(f"model {name} has no version {chosen}")
        return ResolvedSource(name=name, version=chosen, path=folder / str(chosen))


class RegistryModelSource(ModelSource):
    """Versions from the registry service, downloaded once into ``<cache_dir>/<name>/<version>/``.

    Registry versions are immutable, so a complete cached folder is reused; a download goes to a
    temporary folder renamed into place only when every file is verified. ``resolve`` is called off
    the event loop (from a thread), so each call runs its own event loop and channel.
    """

    def __init__(
        self,
        address: str,
        cache_dir: Path,
        *,
        timeout: float = 3600.0,
        api_key: str | None = None,
        field: str = "spec.source",
    ) -> None:
        self.field = field
        self._address = address
        self._cache_dir = cache_dir
        self._timeout = timeout
        self._api_key = api_key

    def resolve(self, name: str, version: int | None = None, alias: str | None = None) -> ResolvedSource:
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgument("a model name without '/'", field=f"{self.field}.name")
        return asyncio.run(self._resolve(name, version, alias))

    async def _resolve(self, name: str, version: int | None, alias: str | None) -> ResolvedSource:
        from llmops.common.artifacts.client import download_to_directory
        from llmops.common.clients import RegistryClient
        from llmops.proto.common.v1 import model_pb2
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        ref = model_pb2.ModelRef(name=name)
        if version:
            ref.version = version
        elif alias:
            ref.alias = alias
        async with RegistryClient.connect(
            self._address, timeout=self._timeout, api_key=self._api_key
        ) as client:
            found = (await client.unary(client.stub.GetVersion, pb.GetVersionRequest(model=ref))).version
            target = self._cache_dir / name / str(found.version)
            if not await asyncio.to_thread(target.is_dir):
                partial = self._cache_dir / name / f".{found.version}.{uuid.uuid4().hex}.partial"
                await asyncio.to_thread(partial.mkdir, parents=True)
                try:
                    exact = model_pb2.ModelRef(name=name, version=found.version)
                    await download_to_directory(client, exact, partial, timeout=self._timeout)
                    await asyncio.to_thread(_move_into_place, partial, target)
                finally:
                    await asyncio.to_thread(shutil.rmtree, partial, True)
        return ResolvedSource(name=name, version=int(found.version), path=target)


def _move_into_place(partial: Path, target: Path) -> None:
    try:
        partial.rename(target)
    except OSError:
        if not target.is_dir():  # lost a race to another download of the same version: keep that one
            raise
