"""Where a model to load comes from: a folder on this server, or a registry version.

:class:`ModelResolver` is the interface the service uses. :class:`LocalPathResolver` serves folders
only; :class:`RegistryResolver` resolves a reference (alias, version or latest) through the registry
service and downloads the version's files, each verified against its sha256, into a cache folder
named by version and manifest hash (so a second load of the same version is instant and a changed
artifact is never mistaken for a cached one). :class:`CompositeResolver` routes between the two.
"""

from __future__ import annotations

import abc
import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, caller_path
from llmops.serving.domain import ModelRef, ModelSource, ResolvedModel, ResolvedSource

#: Registry formats an engine can load as a base model, by ``llmops.common.v1.ModelFormat`` name.
BASE_FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
COMPLETE_MARKER = ".llmops-complete.json"


class ModelResolver(abc.ABC):
    """Turns a :class:`ModelSource` into a local folder."""

    @abc.abstractmethod
    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        """The folder to load (downloaded first when it comes from the registry).

        Args:
            source: the registry reference or local folder.
            adapter: the source must be a LoRA adapter (PEFT layout) rather than a base model.
        """

    @abc.abstractmethod
    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        """The version a reference names now (an alias is looked up at the time of the call)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def check_local_folder(path: str, *, adapter: bool) -> Path:
    """A folder that holds a Hugging Face model (``config.json``) or a PEFT adapter.

    Raises:
        NotFound: no such folder. InvalidArgument: not a model folder, or not a path at all (too
        long, a symlink loop, ``~user`` of no user). PermissionDenied: the server may not read it.
    """
    marker = "adapter_config.json" if adapter else "config.json"
    with caller_path(path, field="local_path"):
        try:
            folder = Path(path).expanduser()
        except RuntimeError:  # ~user with no such user
            raise InvalidArgument(f"{path}: no such home directory", field="local_path") from None
        if not folder.is_dir():
            raise NotFound(f"no folder {path} on this server")
        if not (folder / marker).is_file():
            kind = "a PEFT adapter" if adapter else "a Hugging Face model"
            raise InvalidArgument(f"{path} is not {kind} folder (no {marker})", field="local_path")
        return folder.resolve(strict=True)


class LocalPathResolver(ModelResolver):
    """Folders on this server only; registry references fail with FAILED_PRECONDITION."""

    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        if source.local_path is None:
            raise FailedPrecondition(
                "this server has no registry to resolve model references (set registry.address)"
            )
        return ResolvedSource(path=check_local_folder(source.local_path, adapter=adapter))

    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        raise FailedPrecondition("this server has no registry to resolve model references")


class RegistryResolver(ModelResolver):
    """Registry versions, downloaded and verified into ``cache_dir/<name>/v<version>-<manifest hash>``.

    Args:
        client: a :class:`llmops.common.clients.RegistryClient`.
        cache_dir: where downloaded versions are kept.
    """

    def __init__(self, client: Any, cache_dir: Path) -> None:
        self._client = client
        self._cache_dir = Path(cache_dir)
        self._locks: dict[Path, asyncio.Lock] = {}

    async def _get_version(self, ref: ModelRef) -> Any:
        from llmops.proto.common.v1 import model_pb2
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        proto_ref = model_pb2.ModelRef(name=ref.name)
        if ref.version is not None:
            proto_ref.version = ref.version
        elif ref.alias is not None:
            proto_ref.alias = ref.alias
        response = await self._client.unary(
            self._client.stub.GetVersion, pb.GetVersionRequest(model=proto_ref)
        )
        return response.version

    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        version = await self._get_version(ref)
        return ResolvedModel(version.name, int(version.version), ref.alias or "")

    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        if source.model_ref is None:
            raise InvalidArgument("a registry reference is required", field="model_ref")
        from llmops.proto.common.v1 import model_pb2
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        ref = source.model_ref
        version = await self._get_version(ref)
        if version.status != pb.VERSION_STATUS_READY:
            raise FailedPrecondition(f"{version.name}:{version.version} is not READY")
        fmt = model_pb2.ModelFormat.Name(version.format).removeprefix("MODEL_FORMAT_").lower()
        wanted = ("adapter",) if adapter else BASE_FORMATS
        if fmt not in wanted:
            raise FailedPrecondition(
                f"{version.name}:{version.version} has format {fmt}; this call needs {' or '.join(wanted)}"
            )
        resolved = ResolvedModel(version.name, int(version.version), ref.alias or "")
        folder = self._cache_dir / version.name / f"v{version.version}-{version.manifest_sha256[:16]}"
        lock = self._locks.setdefault(folder, asyncio.Lock())
        async with lock:
            if not (folder / COMPLETE_MARKER).is_file():
                await self._download(version, folder)
        base = None
        if version.HasField("adapter_base") and version.adapter_base.name:
            which = version.adapter_base.WhichOneof("selector")
            base = ModelRef(
                version.adapter_base.name,
                version=version.adapter_base.version if which == "version" else None,
            )
        return ResolvedSource(path=folder, model=resolved, format=fmt, adapter_base=base)

    async def _download(self, version: Any, folder: Path) -> None:
        from llmops.common.artifacts.client import download_to_directory
        from llmops.proto.common.v1 import model_pb2

        staging = folder.with_name(folder.name + ".partial")
        await asyncio.to_thread(shutil.rmtree, staging, True)
        staging.mkdir(parents=True)
        exact = model_pb2.ModelRef(name=version.name, version=version.version)
        files = await download_to_directory(self._client, exact, staging)
        marker = {"name": version.name, "version": int(version.version), "files": [f.path for f in files]}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker))
        await asyncio.to_thread(shutil.rmtree, folder, True)
        staging.rename(folder)

    async def close(self) -> None:
        await self._client.close()


class CompositeResolver(ModelResolver):
    """Folders through ``local``, registry references through ``registry`` (when one is set)."""

    def __init__(self, local: ModelResolver, registry: ModelResolver | None = None) -> None:
        self._local = local
        self._registry = registry

    def _for(self, source: ModelSource) -> ModelResolver:
        if source.local_path is not None or self._registry is None:
            return self._local
        return self._registry

    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        return await self._for(source).resolve(source, adapter=adapter)

    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        return await self._for(ModelSource(model_ref=ref)).resolve_ref(ref)

    async def close(self) -> None:
        await self._local.close()
        if self._registry is not None:
            await self._registry.close()
