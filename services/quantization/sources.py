"""Where a job's source model comes from: :class:`ModelSource` and a local-folder implementation.

The local layout is the one :class:`~llmops.quantization.sinks.LocalDirectorySink` writes
(``<root>/<name>/<version>/``), so a result registered locally can be quantized again (and is then
refused as already quantized). A registry-backed source downloads through ``RegistryClient``.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path

from llmops.common.errors import InvalidArgument, NotFound


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    name: str
    version: int
    path: Path


class ModelSource(abc.ABC):
    """Resolves a model reference to a local folder in Hugging Face layout."""

    @abc.abstractmethod
    def resolve(self, name: str, version: int | None = None, alias: str | None = None) -> ResolvedSource:
        """The folder of ``name`` at ``version`` (latest when neither version nor alias is given).

        Raises:
            NotFound: no such model or version.
        """


class LocalModelSource(ModelSource):
    """Versions as numbered folders under ``root``; aliases are not supported locally."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def resolve(self, name: str, version: int | None = None, alias: str | None = None) -> ResolvedSource:
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgument("a model name without '/'", field="spec.source.name")
        if alias:
            raise InvalidArgument(
                "the local model source has no aliases; give a version", field="spec.source.alias"
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
