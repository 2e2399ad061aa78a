"""Client-side helpers over :class:`llmops.common.clients.RegistryClient`: folder upload and download.

:func:`upload_directory` streams a folder as a RegisterVersion call (metadata, chunks, then a
summary of every file's sha256 so the server can prove it received exactly that).
:func:`download_to_directory` writes each file to a temporary name, checks its size and sha256, and
only then renames it into place; a failed or corrupt download leaves no partial file behind.
Both report progress as ``progress(done_bytes, total_bytes)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llmops.common.artifacts.manifest import local_path, scan_directory
from llmops.common.artifacts.transfer import OrderedWorker
from llmops.common.clients import RegistryClient
from llmops.common.errors import DataLoss, InvalidArgument
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb

Progress = Callable[[int, int], None]
DEFAULT_CHUNK_BYTES = 1024 * 1024
PART_SUFFIX = ".llmops-part"


def _read_hashed(handle: IO[bytes], digest: Any, size: int) -> bytes:
    data = handle.read(size)
    digest.update(data)
    return data


async def upload_requests(
    metadata: pb.VersionMetadata,
    directory: Path,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
    summary: bool = True,
) -> AsyncIterator[pb.RegisterVersionRequest]:
    """The messages of a RegisterVersion call uploading every file under ``directory``."""
    if not await asyncio.to_thread(directory.is_dir):
        raise InvalidArgument(f"{directory} is not a folder")
    yield pb.RegisterVersionRequest(metadata=metadata)
    paths = await asyncio.to_thread(scan_directory, directory)
    sizes = {p: local_path(directory, p).stat().st_size for p in paths}
    total = sum(sizes.values())
    done = 0
    files: list[pb.ManifestFile] = []
    for path in paths:
        digest = hashlib.sha256()
        size = sizes[path]
        handle = await asyncio.to_thread(local_path(directory, path).open, "rb")
        try:
            offset = 0
            pending = asyncio.ensure_future(asyncio.to_thread(_read_hashed, handle, digest, chunk_bytes))
            while True:
                data = await pending
                last = offset + len(data) >= size or not data
                if not last:
                    pending = asyncio.ensure_future(
                        asyncio.to_thread(_read_hashed, handle, digest, chunk_bytes)
                    )
                yield pb.RegisterVersionRequest(
                    chunk=pb.FileChunk(path=path, offset=offset, data=data, last=last)
                )
                offset += len(data)
                done += len(data)
                if progress is not None:
                    progress(done, total)
                if last:
                    break
        finally:
            if not pending.done():
                await asyncio.gather(pending, return_exceptions=True)
            handle.close()
        files.append(pb.ManifestFile(path=path, size_bytes=offset, sha256=digest.hexdigest()))
    if summary:
        yield pb.RegisterVersionRequest(summary=pb.UploadSummary(files=files))


async def upload_directory(
    client: RegistryClient,
    metadata: pb.VersionMetadata,
    directory: Path,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
    timeout: float | None = 3600.0,
) -> pb.ModelVersion:
    """Register the folder ``directory`` as a new version; returns it READY."""
    requests = upload_requests(metadata, directory, chunk_bytes=chunk_bytes, progress=progress)
    response = await client.client_stream(client.stub.RegisterVersion, requests, timeout=timeout)
    return response.version


@dataclass(frozen=True)
class DownloadedFile:
    """A file written by :func:`download_to_directory`, verified."""

    path: str
    size_bytes: int
    sha256: str


async def download_to_directory(
    client: RegistryClient,
    ref: model_pb2.ModelRef,
    destination: Path,
    *,
    paths: Sequence[str] = (),
    chunk_bytes: int = 0,
    progress: Progress | None = None,
    timeout: float | None = 3600.0,
) -> list[DownloadedFile]:
    """Download a version's files into ``destination``, each verified before it appears there.

    Raises:
        DataLoss: the server found the artifact corrupt, or a file's bytes do not match the sha256
            sent with its last chunk. Files completed before the failure stay; the broken one does not.
    """
    request = pb.DownloadArtifactRequest(model=ref, paths=list(paths), chunk_size_bytes=chunk_bytes)
    sink = _VerifiedFiles(destination)
    worker = OrderedWorker()  # writes and hashes while the next chunks arrive
    try:
        async for chunk in client.stream(client.stub.DownloadArtifact, request, timeout=timeout):
            await worker.submit(sink.write, chunk.path, chunk.data, chunk.sha256, chunk.file_size)
            if progress is not None:
                progress(chunk.bytes_sent, chunk.total_bytes)
        await worker.drain()
    finally:
        await worker.close()
        await asyncio.to_thread(sink.abort)
    return sink.written


class _VerifiedFiles:
    """Writes downloaded chunks to ``<name>.llmops-part`` files, renamed only once verified."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self.written: list[DownloadedFile] = []
        self._handle: IO[bytes] | None = None
        self._part: Path | None = None
        self._digest: Any = None

    def write(self, path: str, data: bytes, sha256: str, file_size: int) -> None:
        if self._handle is None:
            final = local_path(self.destination, path)
            final.parent.mkdir(parents=True, exist_ok=True)
            self._part = final.with_name(final.name + PART_SUFFIX)
            self._handle = self._part.open("wb")
            self._digest = hashlib.sha256()
        self._handle.write(data)
        self._digest.update(data)
        if not sha256:
            return
        self._handle.close()
        self._handle = None
        assert self._part is not None
        size = self._part.stat().st_size
        if self._digest.hexdigest() != sha256 or size != file_size:
            raise DataLoss(f"{path}: received bytes do not match the sha256 the server sent")
        os.replace(self._part, local_path(self.destination, path))
        self._part = None
        self.written.append(DownloadedFile(path, size, sha256))

    def abort(self) -> None:
        """Remove the file being written, if any (a failed or cut-off download)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._part is not None:
            self._part.unlink(missing_ok=True)
            self._part = None
