"""Domain objects of the registry: what the service logic and the stores speak (never proto types).

Every object is immutable. Timestamps are timezone-aware UTC datetimes. A version number is an
``int`` >= 1; ``0`` stands for "no version" where the API says so (alias history).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from llmops.common.artifacts.domain import (
    DownloadChunk as DownloadChunk,  # re-exported: the registry's wire vocabulary
)
from llmops.common.artifacts.domain import FileChunk as FileChunk
from llmops.common.artifacts.domain import ManifestFile as ManifestFile
from llmops.common.artifacts.domain import UploadPart as UploadPart
from llmops.common.artifacts.domain import UploadSummary as UploadSummary
from llmops.common.datasets import DatasetRef as DatasetRef  # re-exported: lineage names the data
from llmops.common.domain import ModelRef as ModelRef  # re-exported: a version's address
from llmops.common.errors import InvalidArgument

T = TypeVar("T")


class ModelFormat(enum.Enum):
    """How a version's weights are stored (``llmops.common.v1.ModelFormat``)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    GGUF = "gguf"
    ADAPTER = "adapter"

    @property
    def metric_label(self) -> str:
        """The bounded ``format`` label of the registry metrics: safetensors | adapter | gguf."""
        if self is ModelFormat.GGUF:
            return "gguf"
        if self is ModelFormat.ADAPTER:
            return "adapter"
        return "safetensors"

    @property
    def is_full_weights(self) -> bool:
        """Hugging Face layout with config.json and safetensors weights."""
        return self not in (ModelFormat.GGUF, ModelFormat.ADAPTER)


class VersionStatus(enum.Enum):
    """Where a version is in registration."""

    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


class JobKind(enum.Enum):
    """Which service ran the job that made a version."""

    NONE = "NONE"
    TRAINING = "TRAINING"
    QUANTIZATION = "QUANTIZATION"


#: Tag-key prefixes kept for the registry's own bookkeeping (and MLflow's); callers may not use them.
RESERVED_TAG_PREFIXES = ("llmops.", "mlflow.")
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_ALIAS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
#: MLflow reserves ``latest`` and version-like aliases (``v1``), so the registry does too.
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$")


def check_model_name(name: str, field_name: str = "name") -> str:
    """Return ``name`` if it is a valid model name, else raise ``InvalidArgument``."""
    if not _MODEL_NAME.match(name):
        raise InvalidArgument(
            f"model name {name!r} must be 1-128 characters from [a-z0-9._-], starting with a letter or digit",
            field=field_name,
        )
    return name


def check_alias_name(alias: str, field_name: str = "alias") -> str:
    """Return ``alias`` if it is a valid, unreserved alias name, else raise ``InvalidArgument``."""
    if not _ALIAS_NAME.match(alias):
        raise InvalidArgument(
            f"alias {alias!r} must be 1-64 characters from [a-z0-9_-], starting with a letter",
            field=field_name,
        )
    if _RESERVED_ALIAS.match(alias):
        raise InvalidArgument(f"alias {alias!r} is reserved", field=field_name)
    return alias


@dataclass(frozen=True)
class Lineage:
    """What a version was made from and by what. A stored parent always has ``version`` set."""

    parent: ModelRef | None = None
    dataset: DatasetRef | None = None
    dataset_commit: str = ""
    mlflow_run_id: str = ""
    job_id: str = ""
    job_kind: JobKind = JobKind.NONE


@dataclass(frozen=True)
class Model:
    """A named series of versions."""

    name: str
    description: str
    tags: dict[str, str]
    created_at: datetime
    updated_at: datetime
    created_by: str
    latest_version: int
    version_count: int
    aliases: dict[str, int]


@dataclass(frozen=True)
class NewVersion:
    """Everything a store needs to add a version; the store assigns the number and the time."""

    model_name: str
    format: ModelFormat
    status: VersionStatus
    manifest: tuple[ManifestFile, ...]
    manifest_sha256: str
    parameter_count: int = 0
    base_model: str = ""
    adapter_base: ModelRef | None = None
    lineage: Lineage = field(default_factory=Lineage)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    created_by: str = ""
    request_id: str = ""
    failure_reason: str = ""

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.manifest)


@dataclass(frozen=True)
class ModelVersion:
    """One immutable, numbered version of a model."""

    name: str
    version: int
    format: ModelFormat | None  # None: registered outside llmops (directly in MLflow)
    status: VersionStatus
    artifact_uri: str
    manifest: tuple[ManifestFile, ...]
    manifest_sha256: str
    parameter_count: int
    base_model: str
    adapter_base: ModelRef | None
    lineage: Lineage
    metrics: dict[str, float]
    tags: dict[str, str]
    description: str
    created_at: datetime
    created_by: str
    aliases: tuple[str, ...] = ()
    failure_reason: str = ""

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.manifest)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, version=self.version)


@dataclass(frozen=True)
class AliasMove:
    """One change of an alias; ``0`` as from/to means created/deleted by this change."""

    model_name: str
    alias: str
    from_version: int
    to_version: int
    moved_by: str
    moved_at: datetime
    reason: str = ""


@dataclass(frozen=True)
class ResolvedAlias:
    """Where an alias points now, and since when."""

    model_name: str
    alias: str
    version: int
    moved_at: datetime


@dataclass(frozen=True)
class VersionSpec:
    """A registration request as the caller sent it: references not yet resolved."""

    model_name: str
    format: ModelFormat | None
    create_model: bool = False
    base_model: str = ""
    adapter_base: ModelRef | None = None
    lineage: Lineage = field(default_factory=Lineage)
    parameter_count: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    source_uri: str = ""
    aliases: tuple[str, ...] = ()
    request_id: str = ""


@dataclass(frozen=True)
class DownloadRequest:
    """Which files of which version to stream, from where."""

    ref: ModelRef
    paths: tuple[str, ...] = ()
    chunk_size_bytes: int = 0
    resume_path: str = ""
    resume_offset: int = 0


@dataclass(frozen=True)
class LineageChain:
    """Versions from the requested one back towards the root."""

    versions: tuple[ModelVersion, ...]
    truncated: bool


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; ``next_token`` empty on the last page."""

    items: tuple[T, ...]
    next_token: str = ""
