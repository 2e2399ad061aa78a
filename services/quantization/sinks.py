"""Where a finished quantization result goes: :class:`ResultSink` and a local-folder sink.

The job core only needs ``register(metadata, directory) -> RegisteredVersion``; a registry-backed
sink (through ``RegistryClient``) implements the same interface, so the core is tested without a
registry.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class VersionMetadata:
    """What the result is registered with: lineage, evidence and labels."""

    model_name: str
    parent_name: str
    parent_version: int | None
    description: str
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RegisteredVersion:
    """A registered result."""

    name: str
    version: int
    uri: str


class ResultSink(abc.ABC):
    """Receives a finished result folder and makes it a new version."""

    @abc.abstractmethod
    def register(self, metadata: VersionMetadata, directory: Path) -> RegisteredVersion:
        """Store ``directory``'s files as the next version of ``metadata.model_name``."""


class LocalDirectorySink(ResultSink):
    """Versions as numbered folders: ``<root>/<model>/<n>/`` with a ``version.json`` beside the files."""

    METADATA_FILE = "version.json"

    def __init__(self, root: Path) -> None:
        self._root = root
        self._lock = threading.Lock()

    def register(self, metadata: VersionMetadata, directory: Path) -> RegisteredVersion:
        model_dir = self._root / metadata.model_name
        with self._lock:
            model_dir.mkdir(parents=True, exist_ok=True)
            existing = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
            version = max(existing, default=0) + 1
            target = model_dir / str(version)
            shutil.copytree(directory, target)
        record = dataclasses.asdict(metadata) | {"version": version}
        (target / self.METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return RegisteredVersion(name=metadata.model_name, version=version, uri=target.resolve().as_uri())
