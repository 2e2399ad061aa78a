"""Where a job's finished model goes: :class:`ResultSink` and a local-folder sink.

Training and quantization jobs only need ``register(metadata, directory) -> RegisteredVersion``; the
registry-backed :class:`RegistrySink` (through ``RegistryClient``) implements the same interface, so
the job cores are tested without a registry.
"""

from __future__ import annotations

import abc
import asyncio
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
    #: How the weights are stored: "fp32", "bf16", "fp16", "int8", "int4", "gguf" or "adapter".
    format: str = ""
    #: The job that produced the result; empty when unknown.
    job_id: str = ""
    #: Which service ran ``job_id``: "quantization" or "training".
    job_kind: str = "quantization"
    #: For an adapter: the version it applies to (name, version).
    adapter_base: tuple[str, int] | None = None
    #: The data it was trained or calibrated on: (path, revision, repo) and the commit read.
    dataset: tuple[str, str, str] | None = None
    dataset_commit: str = ""
    mlflow_run_id: str = ""
    #: Foundation model it descends from, for people; empty when unknown.
    base_model: str = ""
    parameter_count: int = 0


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


#: The registry's ``ModelFormat`` names of the quantizers' artifact formats.
_REGISTRY_FORMATS = {
    name: f"MODEL_FORMAT_{name.upper()}"
    for name in ("fp32", "bf16", "fp16", "int8", "int4", "gguf", "adapter")
}
_JOB_KINDS = {"quantization": "JOB_KIND_QUANTIZATION", "training": "JOB_KIND_TRAINING"}


class RegistrySink(ResultSink):
    """Uploads the result folder to the registry service as a new version of ``metadata.model_name``.

    The version's lineage names the source version as its parent, the job and its kind, and the data
    and MLflow run where known; the measurements go into its metrics. ``register`` is called from a job's worker thread, so
    each call runs its own event loop and channel.
    """

    def __init__(self, address: str, *, timeout: float = 3600.0, api_key: str | None = None) -> None:
        self._address = address
        self._timeout = timeout
        self._api_key = api_key

    def register(self, metadata: VersionMetadata, directory: Path) -> RegisteredVersion:
        return asyncio.run(self._register(metadata, directory))

    async def _register(self, metadata: VersionMetadata, directory: Path) -> RegisteredVersion:
        from llmops.common.artifacts.client import upload_directory
        from llmops.common.clients import RegistryClient
        from llmops.common.errors import InvalidArgument
        from llmops.proto.common.v1 import dataset_pb2, job_pb2, model_pb2
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        if metadata.format not in _REGISTRY_FORMATS:
            raise InvalidArgument(f"the registry sink cannot store format {metadata.format!r}")
        lineage = pb.Lineage(
            job_id=metadata.job_id,
            dataset_commit=metadata.dataset_commit,
            mlflow_run_id=metadata.mlflow_run_id,
        )
        if metadata.job_id:
            lineage.job_kind = job_pb2.JobKind.Value(_JOB_KINDS[metadata.job_kind])
        if metadata.dataset is not None:
            path, revision, repo = metadata.dataset
            lineage.dataset.CopyFrom(dataset_pb2.DatasetRef(path=path, revision=revision, repo=repo))
        if metadata.parent_version is not None:
            lineage.parent.CopyFrom(
                model_pb2.ModelRef(name=metadata.parent_name, version=metadata.parent_version)
            )
        request = pb.VersionMetadata(
            model_name=metadata.model_name,
            create_model=True,
            format=model_pb2.ModelFormat.Value(_REGISTRY_FORMATS[metadata.format]),
            lineage=lineage,
            metrics=dict(metadata.metrics),
            tags=dict(metadata.tags),
            description=metadata.description,
            aliases=list(metadata.aliases),
            base_model=metadata.base_model,
            parameter_count=metadata.parameter_count,
            request_id=f"{metadata.job_kind}-{metadata.job_id}" if metadata.job_id else "",
        )
        if metadata.adapter_base is not None:
            base_name, base_version = metadata.adapter_base
            request.adapter_base.CopyFrom(model_pb2.ModelRef(name=base_name, version=base_version))
        async with RegistryClient.connect(
            self._address, timeout=self._timeout, api_key=self._api_key
        ) as client:
            version = await upload_directory(client, request, directory, timeout=self._timeout)
        return RegisteredVersion(name=version.name, version=version.version, uri=version.artifact_uri)
