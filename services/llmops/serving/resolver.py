"""Where a model to load comes from: a folder on this server, or a registry version.

:class:`ModelResolver` is the interface the service uses. :class:`LocalPathResolver` serves folders
only; :class:`RegistryResolver` resolves a reference (alias, version or latest) through the registry
service and puts the version's files, each verified against its sha256, into the node-local cache
(:class:`~llmops.common.artifacts.node_cache.NodeCache`, keyed by the manifest digest, shared by
every serving process on the node), so a reload, a restart or a second pod of the same version
downloads nothing. The files come straight from the artifact store (``weights.source="store"``, the
default: a shared volume or presigned S3 URLs the registry's GetArtifactLocations hands out), never
through the registry process; streaming them through the registry's DownloadArtifact happens only
when ``weights.source="registry"`` says so (the laptop/legacy path). :class:`CompositeResolver`
routes between the two.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Literal

from llmops.common.artifacts.direct import Access, DirectFetcher, DirectLocations
from llmops.common.artifacts.domain import ManifestFile
from llmops.common.artifacts.node_cache import COMPLETE_MARKER, NodeCache
from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, caller_path
from llmops.serving.domain import ModelRef, ModelSource, ResolvedModel, ResolvedSource

#: Registry formats an engine can load as a base model, by ``llmops.common.v1.ModelFormat`` name.
BASE_FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
WeightsSource = Literal["store", "registry"]
__all__ = ["COMPLETE_MARKER", "CompositeResolver", "LocalPathResolver", "ModelResolver", "RegistryResolver"]

log = logging.getLogger(__name__)


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

    def release(self, path: Path) -> None:  # noqa: B027 - optional hook
        """The folder :meth:`resolve` returned is no longer served (its node-cache entry may be evicted)."""

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
    """Registry versions, verified into the node cache ``cache_dir/sha256/<manifest sha256>``.

    Args:
        client: a :class:`llmops.common.clients.RegistryClient`.
        cache_dir: the node-local cache (shared by the serving processes of a node).
        source: ``"store"`` reads files straight from the artifact store; ``"registry"`` streams
            them through the registry's DownloadArtifact (explicit only: the laptop/legacy path).
        fetcher: reads from the store (shared-volume mapping, concurrency, timeouts).
        url_ttl_seconds: validity asked of presigned URLs (0: the registry's default).
        cache_max_bytes: the node cache's byte budget (0: never evict). Each resolved version is
            held in use (not evictable) until :meth:`release` of its folder or :meth:`close`.
    """

    def __init__(
        self,
        client: Any,
        cache_dir: Path,
        *,
        source: WeightsSource = "store",
        fetcher: DirectFetcher | None = None,
        url_ttl_seconds: int = 0,
        cache_max_bytes: int = 0,
    ) -> None:
        if source not in ("store", "registry"):
            raise InvalidArgument(f"weights source must be store or registry, not {source!r}")
        self._client = client
        self.cache = NodeCache(Path(cache_dir), max_bytes=cache_max_bytes)
        self.source = source
        self._fetcher = fetcher or DirectFetcher()
        self._ttl = url_ttl_seconds

    @staticmethod
    def _proto_ref(ref: ModelRef) -> Any:
        from llmops.proto.common.v1 import model_pb2

        proto_ref = model_pb2.ModelRef(name=ref.name)
        if ref.version is not None:
            proto_ref.version = ref.version
        elif ref.alias is not None:
            proto_ref.alias = ref.alias
        return proto_ref

    async def _get_version(self, ref: ModelRef) -> Any:
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        request = pb.GetVersionRequest(model=self._proto_ref(ref))
        response = await self._client.unary(self._client.stub.GetVersion, request)
        return response.version

    async def _locations(self, ref: Any) -> Any:
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        request = pb.GetArtifactLocationsRequest(model=ref, url_ttl_seconds=self._ttl)
        return await self._client.unary(self._client.stub.GetArtifactLocations, request)

    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        version = await self._get_version(ref)
        return ResolvedModel(version.name, int(version.version), ref.alias or "")

    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        if source.model_ref is None:
            raise InvalidArgument("a registry reference is required", field="model_ref")
        from llmops.proto.common.v1 import model_pb2
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        ref = source.model_ref
        located = None
        if self.source == "store":
            located = await self._locations(self._proto_ref(ref))
            version = located.version
        else:
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
        manifest = [ManifestFile(f.path, f.size_bytes, f.sha256) for f in version.manifest]
        label = f"{version.name}:{version.version}"

        async def fill(folder: Path) -> None:
            if located is None:
                await self._stream(version, folder)
            else:
                await self._fetch(located, folder)

        folder, _ = await self.cache.get_or_fill(version.manifest_sha256, manifest, fill, label=label)
        base = None
        if version.HasField("adapter_base") and version.adapter_base.name:
            which = version.adapter_base.WhichOneof("selector")
            base = ModelRef(
                version.adapter_base.name,
                version=version.adapter_base.version if which == "version" else None,
            )
        return ResolvedSource(path=folder, model=resolved, format=fmt, adapter_base=base)

    def release(self, path: Path) -> None:
        if path.parent == self.cache.root / "sha256":
            self.cache.release(path.name)

    async def _fetch(self, located: Any, folder: Path) -> None:
        """Files straight from the store; refused presigned URLs (expired) are asked for once more."""
        locations = DirectLocations.from_proto(located)
        try:
            await self._fetcher.fetch(locations, folder)
        except FailedPrecondition as exc:
            if locations.access is not Access.PRESIGNED_URL:
                raise
            log.warning("%s; asking the registry for new URLs", exc)
            from llmops.proto.common.v1 import model_pb2

            exact = model_pb2.ModelRef(name=located.version.name, version=located.version.version)
            fresh = DirectLocations.from_proto(await self._locations(exact))
            if fresh.manifest_sha256 != locations.manifest_sha256:
                raise FailedPrecondition(f"{fresh.name}:{fresh.version} changed its manifest") from exc
            await self._fetcher.fetch(fresh, folder)

    async def _stream(self, version: Any, folder: Path) -> None:
        """Files through the registry's DownloadArtifact (weights.source=registry only)."""
        from llmops.common.artifacts.client import download_to_directory
        from llmops.proto.common.v1 import model_pb2

        log.info(
            "streaming %s:%s through the registry (weights.source=registry)", version.name, version.version
        )
        exact = model_pb2.ModelRef(name=version.name, version=version.version)
        await download_to_directory(self._client, exact, folder)

    async def close(self) -> None:
        self.cache.close()
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

    def release(self, path: Path) -> None:
        if self._registry is not None:
            self._registry.release(path)

    async def close(self) -> None:
        await self._local.close()
        if self._registry is not None:
            await self._registry.close()
