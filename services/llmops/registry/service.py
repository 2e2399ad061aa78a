"""The registry's logic on domain objects: validation, registration, aliases, downloads, lineage.

Registration is all or nothing. Uploaded chunks go to a private staging folder and are hashed as
they arrive; the version is created only once the stream has ended, the client's summary (if any)
matched and the files passed :mod:`.validation`. A stream that breaks before that leaves nothing:
the staging folder is removed and the store was never called. Once the commit to the store has
begun it is finished even if the caller goes away, so a version is never half-registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path

from llmops.common.artifacts import manifest as manifests
from llmops.common.artifacts.transfer import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    OrderedWorker,
    StagingWriter,
    stream_verified,
)
from llmops.common.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from llmops.registry.domain import (
    AliasMove,
    DownloadChunk,
    DownloadRequest,
    FileChunk,
    LineageChain,
    ManifestFile,
    Model,
    ModelFormat,
    ModelRef,
    ModelVersion,
    NewVersion,
    Page,
    ResolvedAlias,
    UploadPart,
    UploadSummary,
    VersionSpec,
    VersionStatus,
    check_alias_name,
    check_model_name,
)
from llmops.registry.metrics import RegistryMetrics
from llmops.registry.requests import (
    MAX_ALIASES,
    MAX_DESCRIPTION_BYTES,
    MAX_DOWNLOAD_PATHS,
    MAX_METRICS,
    MAX_REASON_BYTES,
    MAX_REQUEST_ID_BYTES,
    MAX_TAG_KEY_BYTES,
    MAX_TAGS,
    RegistryLimits,
    check_tags,
    check_text,
    decode_token,
    encode_token,
    page_size_or_default,
)
from llmops.registry.stores.base import RegistryStore
from llmops.registry.validation import validate_artifact


class RegistryService:
    """Model registry logic over a :class:`RegistryStore`.

    Args:
        store: metadata and artifact storage.
        staging_dir: private folder for uploads in progress (best on the artifact store's disk,
            so a registered upload moves into place without a copy).
        metrics: the registry's Prometheus metrics.
        limits: size and source bounds.
    """

    def __init__(
        self,
        store: RegistryStore,
        staging_dir: Path,
        metrics: RegistryMetrics,
        limits: RegistryLimits | None = None,
    ) -> None:
        self.store = store
        self.staging_dir = staging_dir
        self.metrics = metrics
        self.limits = limits or RegistryLimits()

    def clear_staging(self) -> None:
        """Remove uploads a crashed process left behind (call before serving)."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    # --- models ------------------------------------------------------------------------------------

    async def create_model(self, name: str, description: str, tags: Mapping[str, str], caller: str) -> Model:
        check_model_name(name)
        check_text(description, MAX_DESCRIPTION_BYTES, "description")
        return await self.store.create_model(name, description, check_tags(tags), caller)

    async def get_model(self, name: str) -> Model:
        return await self.store.get_model(check_model_name(name))

    async def list_models(
        self, *, page_size: int, page_token: str, name_prefix: str, tags: Mapping[str, str]
    ) -> Page[Model]:
        limit = page_size_or_default(page_size)
        after = decode_token(page_token, str) or ""
        if name_prefix and not all(c.isalnum() or c in "._-" for c in name_prefix):
            raise InvalidArgument("may hold only model-name characters", field="name_prefix")
        if len(tags) > MAX_TAGS:
            raise InvalidArgument(f"at most {MAX_TAGS} tags to filter on", field="tags")
        models = await self.store.list_models(
            name_prefix=name_prefix, tags=dict(tags), after=str(after), limit=limit + 1
        )
        more = len(models) > limit
        models = models[:limit]
        return Page(tuple(models), encode_token(models[-1].name) if more else "")

    # --- versions ----------------------------------------------------------------------------------

    async def resolve(self, ref: ModelRef, field: str = "model") -> ModelVersion:
        """The version a reference names now (alias resolved; latest READY when unset)."""
        check_model_name(ref.name, f"{field}.name")
        if ref.version is not None:
            if ref.version < 1:
                raise InvalidArgument("version must be >= 1", field=f"{field}.version")
            return await self.store.get_version(ref.name, ref.version)
        if ref.alias is not None:
            check_alias_name(ref.alias, f"{field}.alias")
            resolved = await self.store.resolve_alias(ref.name, ref.alias)
            return await self.store.get_version(ref.name, resolved.version)
        latest = await self.store.list_versions(
            ref.name, statuses=frozenset({VersionStatus.READY}), below=0, limit=1
        )
        if not latest:
            raise NotFound(f"model {ref.name!r} has no READY version")
        return latest[0]

    async def get_version(self, ref: ModelRef) -> ModelVersion:
        return await self.resolve(ref)

    async def list_versions(
        self, name: str, *, page_size: int, page_token: str, statuses: frozenset[VersionStatus] | None
    ) -> Page[ModelVersion]:
        check_model_name(name, "model_name")
        limit = page_size_or_default(page_size)
        below = int(decode_token(page_token, int) or 0)
        versions = await self.store.list_versions(name, statuses=statuses, below=below, limit=limit + 1)
        more = len(versions) > limit
        versions = versions[:limit]
        return Page(tuple(versions), encode_token(versions[-1].version) if more else "")

    async def _ready_ref(self, ref: ModelRef, field: str) -> ModelVersion:
        version = await self.resolve(ref, field)
        if version.status is not VersionStatus.READY:
            raise FailedPrecondition(f"{version.ref} is {version.status.value}, not READY")
        return version

    async def _check_spec(self, spec: VersionSpec) -> tuple[VersionSpec, bool]:
        """Validate a registration's metadata; resolve its references to exact versions.

        Returns:
            The checked metadata, and whether the model exists already.
        """
        check_model_name(spec.model_name, "metadata.model_name")
        if spec.format is None:
            raise InvalidArgument("format is required", field="metadata.format")
        check_tags(spec.tags, "metadata.tags")
        check_text(spec.description, MAX_DESCRIPTION_BYTES, "metadata.description")
        check_text(spec.request_id, MAX_REQUEST_ID_BYTES, "metadata.request_id")
        if spec.parameter_count < 0:
            raise InvalidArgument("must be >= 0", field="metadata.parameter_count")
        if len(spec.metrics) > MAX_METRICS:
            raise InvalidArgument(f"at most {MAX_METRICS} metrics", field="metadata.metrics")
        if len(spec.aliases) > MAX_ALIASES:
            raise InvalidArgument(f"at most {MAX_ALIASES} aliases", field="metadata.aliases")
        for key, value in spec.metrics.items():
            if not key or len(key.encode()) > MAX_TAG_KEY_BYTES or not math.isfinite(value):
                raise InvalidArgument(
                    f"metric {key!r} needs a 1-128 byte name and a finite value", field="metadata.metrics"
                )
        for alias in spec.aliases:
            check_alias_name(alias, "metadata.aliases")
        if spec.source_uri:
            scheme = spec.source_uri.partition(":")[0]
            if scheme not in self.limits.source_uri_schemes:
                raise InvalidArgument(f"scheme {scheme!r} is not accepted", field="metadata.source_uri")
        if (spec.format is ModelFormat.ADAPTER) != (spec.adapter_base is not None):
            raise InvalidArgument(
                "adapter_base is required for format ADAPTER and not allowed otherwise",
                field="metadata.adapter_base",
            )
        exists = await self._model_exists(spec.model_name)
        if not exists and not spec.create_model:
            raise NotFound(f"model {spec.model_name!r} does not exist (set create_model to create it)")
        adapter_base = None
        if spec.adapter_base is not None:
            base = await self._ready_ref(spec.adapter_base, "metadata.adapter_base")
            if base.format is ModelFormat.ADAPTER:
                raise InvalidArgument("an adapter's base must be a full model", field="metadata.adapter_base")
            adapter_base = base.ref
        lineage = spec.lineage
        if lineage.parent is not None:
            parent = await self._ready_ref(lineage.parent, "metadata.lineage.parent")
            lineage = replace(lineage, parent=parent.ref)
        return replace(spec, adapter_base=adapter_base, lineage=lineage), exists

    async def register_version(
        self, spec: VersionSpec, parts: AsyncIterator[UploadPart], caller: str
    ) -> ModelVersion:
        """Register a version from uploaded chunks (or ``spec.source_uri``), all or nothing.

        Raises:
            InvalidArgument: bad metadata, chunks out of order, or not a loadable model.
            NotFound: the model (without ``create_model``) or a referenced version is missing.
            DataLoss: the client's summary disagrees with what arrived (a FAILED version records it).
        """
        spec, exists = await self._check_spec(spec)
        if spec.request_id and exists:
            earlier = await self.store.find_request(spec.model_name, spec.request_id)
            if earlier is not None:
                return earlier
        staging = self.staging_dir / uuid.uuid4().hex
        files_dir = staging / "files"
        try:
            manifest, summary = await self._receive(spec, parts, files_dir)
            if summary is not None and (problems := manifests.differences(summary.files, manifest)):
                self.metrics.verification_failures.inc()
                await self._commit(spec, exists, manifest, None, caller, failure="; ".join(problems[:5]))
                raise DataLoss(f"upload does not match its summary: {'; '.join(problems[:5])}")
            assert spec.format is not None
            report = await asyncio.to_thread(
                validate_artifact, files_dir, [f.path for f in manifest], spec.format
            )
            if not spec.parameter_count and report.parameter_count:
                spec = replace(spec, parameter_count=report.parameter_count)
            commit = asyncio.ensure_future(self._commit(spec, exists, manifest, files_dir, caller))
            try:
                version = await asyncio.shield(commit)
            except asyncio.CancelledError:
                await asyncio.wait([commit])  # the caller left after the upload: finish anyway
                raise
            self.metrics.versions_registered.labels(
                version.format.metric_label if version.format else "safetensors"
            ).inc()
            return version
        finally:
            close = getattr(parts, "aclose", None)
            if close is not None:  # finish the request stream now, not when it is garbage-collected
                with contextlib.suppress(Exception):
                    await close()
            await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _model_exists(self, name: str) -> bool:
        try:
            await self.store.get_model(name)
        except NotFound:
            return False
        return True

    async def _receive(
        self, spec: VersionSpec, parts: AsyncIterator[UploadPart], files_dir: Path
    ) -> tuple[tuple[ManifestFile, ...], UploadSummary | None]:
        summary: UploadSummary | None = None
        if spec.source_uri:
            async for part in parts:
                if isinstance(part, FileChunk):
                    raise InvalidArgument("no chunks may follow metadata with a source_uri", field="chunk")
                summary = await self._after_summary(part, summary)
            await asyncio.to_thread(files_dir.parent.mkdir, parents=True, exist_ok=True)
            await self.store.fetch_source(spec.source_uri, files_dir)
            return await asyncio.to_thread(manifests.build_manifest, files_dir), summary
        await asyncio.to_thread(files_dir.mkdir, parents=True)
        writer = StagingWriter(files_dir, self.limits.max_artifact_bytes)
        worker = OrderedWorker()  # writes and hashes while the next chunks arrive
        uploaded = self.metrics.artifact_bytes.labels("upload")
        try:
            async for part in parts:
                if isinstance(part, UploadSummary):
                    summary = await self._after_summary(part, summary)
                    continue
                if summary is not None:
                    raise InvalidArgument("the summary must be the last message", field="summary")
                await worker.submit(writer.write, part)
                uploaded.inc(len(part.data))
            await worker.drain()
            manifest = writer.finish()
        finally:
            await worker.close()
            await asyncio.to_thread(writer.close)
        if not manifest:
            raise InvalidArgument("no files were uploaded", field="chunk")
        return manifest, summary

    @staticmethod
    async def _after_summary(part: UploadPart, summary: UploadSummary | None) -> UploadSummary:
        if summary is not None:
            raise InvalidArgument("only one summary may be sent", field="summary")
        assert isinstance(part, UploadSummary)
        for entry in part.files:
            manifests.check_path(entry.path, "summary.files.path")
            manifests.check_sha256(entry.sha256, "summary.files.sha256")
        return part

    async def _commit(
        self,
        spec: VersionSpec,
        model_exists: bool,
        manifest: tuple[ManifestFile, ...],
        files_dir: Path | None,
        caller: str,
        failure: str = "",
    ) -> ModelVersion:
        if not model_exists:
            with contextlib.suppress(AlreadyExists):  # a concurrent registration created it
                await self.store.create_model(spec.model_name, "", {}, caller)
        assert spec.format is not None
        new = NewVersion(
            model_name=spec.model_name,
            format=spec.format,
            status=VersionStatus.FAILED if failure else VersionStatus.READY,
            manifest=() if failure else manifest,
            manifest_sha256="" if failure else manifests.manifest_sha256(manifest),
            parameter_count=spec.parameter_count,
            base_model=spec.base_model,
            adapter_base=spec.adapter_base,
            lineage=spec.lineage,
            metrics=dict(spec.metrics),
            tags=dict(spec.tags),
            description=spec.description,
            created_by=caller,
            request_id="" if failure else spec.request_id,  # a retry after a failure may succeed
            failure_reason=failure,
        )
        version = await self.store.add_version(new, files_dir)
        if failure:
            return version
        for alias in spec.aliases:
            await self.store.move_alias(
                spec.model_name,
                alias,
                version.version,
                expected=None,
                moved_by=caller,
                reason="set at registration",
            )
        if spec.aliases:
            version = await self.store.get_version(spec.model_name, version.version)
        return version

    # --- aliases -----------------------------------------------------------------------------------

    async def set_alias(
        self, name: str, alias: str, version: int, *, expected: int | None, reason: str, caller: str
    ) -> AliasMove:
        check_model_name(name, "model_name")
        check_alias_name(alias)
        check_text(reason, MAX_REASON_BYTES, "reason")
        if version < 1:
            raise InvalidArgument("must be >= 1", field="version")
        if expected is not None and expected < 0:
            raise InvalidArgument("must be >= 0", field="expected_current_version")
        await self._ready_ref(ModelRef(name, version=version), "version")
        return await self.store.move_alias(
            name, alias, version, expected=expected, moved_by=caller, reason=reason
        )

    async def delete_alias(
        self, name: str, alias: str, *, expected: int | None, reason: str, caller: str
    ) -> AliasMove:
        check_model_name(name, "model_name")
        check_alias_name(alias)
        check_text(reason, MAX_REASON_BYTES, "reason")
        return await self.store.move_alias(
            name, alias, None, expected=expected, moved_by=caller, reason=reason
        )

    async def resolve_alias(self, name: str, alias: str) -> ResolvedAlias:
        return await self.store.resolve_alias(check_model_name(name, "model_name"), check_alias_name(alias))

    async def alias_history(
        self, name: str, alias: str, *, page_size: int, page_token: str
    ) -> Page[AliasMove]:
        check_model_name(name, "model_name")
        if alias:
            check_alias_name(alias)
        limit = page_size_or_default(page_size)
        offset = int(decode_token(page_token, int) or 0)
        moves = await self.store.alias_history(name, alias, offset=offset, limit=limit + 1)
        more = len(moves) > limit
        return Page(tuple(moves[:limit]), encode_token(offset + limit) if more else "")

    # --- downloads and lineage ---------------------------------------------------------------------

    async def download(self, request: DownloadRequest) -> AsyncIterator[DownloadChunk]:
        """Stream a READY version's files, verified against the manifest (DataLoss if corrupt)."""
        if not 0 <= request.chunk_size_bytes <= MAX_CHUNK_BYTES:
            raise InvalidArgument(f"must be in [0, {MAX_CHUNK_BYTES}]", field="chunk_size_bytes")
        if request.resume_offset < 0:
            raise InvalidArgument("must be >= 0", field="resume_offset")
        if len(request.paths) > MAX_DOWNLOAD_PATHS:
            raise InvalidArgument(f"at most {MAX_DOWNLOAD_PATHS} paths", field="paths")
        version = await self._ready_ref(request.ref, "model")
        if version.format is None or not version.manifest:
            raise FailedPrecondition(f"{version.ref} was registered outside llmops and has no manifest")
        if manifests.manifest_sha256(version.manifest) != version.manifest_sha256:
            self.metrics.verification_failures.inc()
            raise DataLoss(f"{version.ref}: the stored manifest does not match its sha256")
        files = list(version.manifest)
        if request.paths:
            by_path = {f.path: f for f in files}
            missing = [p for p in request.paths if p not in by_path]
            if missing:
                raise NotFound(f"not in the manifest of {version.ref}: {', '.join(missing[:5])}")
            wanted = set(request.paths)
            files = [f for f in files if f.path in wanted]
        resume_offset = 0
        if request.resume_path:
            index = next((i for i, f in enumerate(files) if f.path == request.resume_path), None)
            if index is None:
                raise InvalidArgument("not among the files to send", field="resume_path")
            files = files[index:]
            if request.resume_offset > files[0].size_bytes:
                raise InvalidArgument("past the end of resume_path", field="resume_offset")
            resume_offset = request.resume_offset
        elif request.resume_offset:
            raise InvalidArgument("needs resume_path", field="resume_offset")
        root = await self.store.artifact_dir(version)
        chunks = stream_verified(
            root,
            files,
            chunk_size=request.chunk_size_bytes or DEFAULT_CHUNK_BYTES,
            resume_offset=resume_offset,
            on_corrupt=self.metrics.verification_failures.inc,
        )
        downloaded = self.metrics.artifact_bytes.labels("download")
        async for chunk in chunks:
            downloaded.inc(len(chunk.data))
            yield chunk

    async def lineage(self, ref: ModelRef, max_depth: int) -> LineageChain:
        """The version, then its parent, and so on to the root (or ``max_depth`` versions)."""
        if max_depth < 0:
            raise InvalidArgument("must be >= 0", field="max_depth")
        version = await self.resolve(ref)
        chain = [version]
        seen = {(version.name, version.version)}
        while (parent := chain[-1].lineage.parent) is not None:
            if max_depth and len(chain) >= max_depth:
                return LineageChain(tuple(chain), truncated=True)
            assert parent.version is not None
            if (parent.name, parent.version) in seen:
                return LineageChain(tuple(chain), truncated=True)
            try:
                chain.append(await self.store.get_version(parent.name, parent.version))
            except NotFound:
                return LineageChain(tuple(chain), truncated=True)
            seen.add((parent.name, parent.version))
        return LineageChain(tuple(chain), truncated=False)
