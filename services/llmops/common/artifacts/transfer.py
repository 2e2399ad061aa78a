"""Moving artifact bytes: an upload written into a staging folder, and verified chunked reads.

Both hash as they go, so every byte is read once. File I/O and hashing run in worker threads
(``hashlib`` releases the GIL on large buffers), keeping the event loop free; reads are prefetched
one chunk ahead so the disk and the network overlap.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from llmops.common.artifacts.domain import DownloadChunk, FileChunk, ManifestFile
from llmops.common.artifacts.manifest import MAX_FILES, check_path, local_path
from llmops.common.errors import DataLoss, InvalidArgument, ResourceExhausted

#: Largest chunk accepted or sent (the proto's limit, under gRPC's 4 MiB message default).
MAX_CHUNK_BYTES = 3 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024


class OrderedWorker:
    """Runs blocking calls in order on a thread of its own, with up to ``depth`` queued.

    The event loop hands work over and goes back to receiving, so network, disk and hashing overlap
    (``hashlib`` and file writes release the GIL). A failed call raises from the next :meth:`submit`
    or from :meth:`drain` — the earliest failure first, since calls complete in order.
    """

    def __init__(self, depth: int = 4) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmops-transfer")
        self._pending: deque[asyncio.Future[None]] = deque()
        self._depth = depth

    async def submit(self, fn: Callable[..., None], *args: Any) -> None:
        while self._pending and (len(self._pending) >= self._depth or self._pending[0].done()):
            await self._pending.popleft()
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._executor, fn, *args))

    async def drain(self) -> None:
        """Wait for everything submitted; raises the first failure."""
        while self._pending:
            await self._pending.popleft()

    async def close(self) -> None:
        """Wait for queued calls to stop (their errors are dropped), then release the thread."""
        pending, self._pending = list(self._pending), deque()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._executor.shutdown(wait=False)


class StagingWriter:
    """Writes an upload's chunks under ``root``, enforcing the FileChunk ordering rules.

    A file's chunks arrive in offset order without gaps, files one after another; each ends with
    ``last``. Not thread-safe: one upload, one writer, calls in order.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.received = 0
        self._files: dict[str, ManifestFile] = {}
        self._path = ""
        self._handle: IO[bytes] | None = None
        self._hash: Any = None
        self._offset = 0

    def write(self, chunk: FileChunk) -> None:
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise InvalidArgument(
                f"chunk of {len(chunk.data)} bytes exceeds {MAX_CHUNK_BYTES}", field="chunk.data"
            )
        if chunk.path != self._path or self._handle is None:
            self._open(chunk)
        if chunk.offset != self._offset:
            raise InvalidArgument(
                f"{chunk.path}: chunk at offset {chunk.offset}, expected {self._offset} (chunks must be in order)",
                field="chunk.offset",
            )
        self.received += len(chunk.data)
        if self.received > self.max_bytes:
            raise InvalidArgument(f"artifact exceeds the registry's limit of {self.max_bytes} bytes")
        assert self._handle is not None
        try:
            self._handle.write(chunk.data)
        except OSError as exc:
            raise _os_error(exc) from exc
        self._hash.update(chunk.data)
        self._offset += len(chunk.data)
        if chunk.last:
            self._handle.close()
            self._handle = None
            self._files[self._path] = ManifestFile(self._path, self._offset, self._hash.hexdigest())

    def _open(self, chunk: FileChunk) -> None:
        if self._handle is not None:
            raise InvalidArgument(f"{self._path}: file ended without a chunk marked last", field="chunk.last")
        path = check_path(chunk.path, "chunk.path")
        if path in self._files:
            raise InvalidArgument(f"{path}: file sent twice", field="chunk.path")
        if len(self._files) >= MAX_FILES:
            raise InvalidArgument(f"an artifact holds at most {MAX_FILES} files")
        if chunk.offset != 0:
            raise InvalidArgument(f"{path}: first chunk must have offset 0", field="chunk.offset")
        target = local_path(self.root, path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._handle = target.open("xb")
        except OSError as exc:
            raise _os_error(exc, path) from exc
        self._path = path
        self._hash = hashlib.sha256()
        self._offset = 0

    def finish(self) -> tuple[ManifestFile, ...]:
        """The manifest of what arrived, sorted by path."""
        if self._handle is not None:
            raise InvalidArgument(
                f"{self._path}: upload ended before the chunk marked last", field="chunk.last"
            )
        return tuple(sorted(self._files.values(), key=lambda f: f.path))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _os_error(exc: OSError, path: str = "") -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted("the registry's staging disk is full", retry_after_seconds=60.0)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        return InvalidArgument(f"{path}: clashes with another file of the upload", field="chunk.path")
    if exc.errno == errno.ENAMETOOLONG:  # a checked path's part longer than the file system allows
        return InvalidArgument(f"{path}: a part of the path is too long", field="chunk.path")
    return exc  # the staging folder is the server's: anything else is ours (INTERNAL)


def _read_hashed(handle: IO[bytes], digest: Any, size: int) -> bytes:
    data = handle.read(size)
    digest.update(data)
    return data


def _open_checked(path: Path, entry: ManifestFile) -> IO[bytes]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataLoss(f"{entry.path}: file is missing from the artifact store") from None
    size = Path(path).stat().st_size
    if size != entry.size_bytes:
        handle.close()
        raise DataLoss(f"{entry.path}: {size} bytes on disk, manifest says {entry.size_bytes}")
    return handle


async def stream_verified(
    root: Path,
    files: Sequence[ManifestFile],
    *,
    chunk_size: int,
    resume_offset: int,
    on_corrupt: Callable[[], None],
) -> AsyncIterator[DownloadChunk]:
    """Chunks of ``files`` under ``root``, each file's sha256 checked before its last chunk goes out.

    Raises:
        DataLoss: a file is missing, has the wrong size, or does not match its sha256 (the file's
            last chunk is then never sent).
    """
    total = sum(f.size_bytes for f in files) - resume_offset
    sent = 0
    for index, entry in enumerate(files):
        start = resume_offset if index == 0 else 0
        handle = await asyncio.to_thread(_open_checked, local_path(root, entry.path), entry)
        pending: asyncio.Future[bytes] | None = None
        try:
            digest = hashlib.sha256()
            if start:  # the sha256 still covers the whole file
                await asyncio.to_thread(_hash_prefix, handle, digest, start)
            position = start
            pending = asyncio.ensure_future(asyncio.to_thread(_read_hashed, handle, digest, chunk_size))
            while True:
                data = await pending
                position += len(data)
                last = position >= entry.size_bytes
                if not last:
                    if not data:
                        raise DataLoss(f"{entry.path}: file shrank while being read")
                    pending = asyncio.ensure_future(
                        asyncio.to_thread(_read_hashed, handle, digest, chunk_size)
                    )
                sha = ""
                if last:
                    sha = digest.hexdigest()
                    if sha != entry.sha256:
                        on_corrupt()
                        raise DataLoss(
                            f"{entry.path}: sha256 does not match the manifest; the artifact is corrupt"
                        )
                sent += len(data)
                yield DownloadChunk(
                    path=entry.path,
                    offset=position - len(data),
                    data=data,
                    file_size=entry.size_bytes,
                    total_bytes=total,
                    bytes_sent=sent,
                    sha256=sha,
                    file_index=index,
                    file_count=len(files),
                )
                if last:
                    break
        finally:
            if pending is not None and not pending.done():  # let the read in flight finish first
                await asyncio.gather(pending, return_exceptions=True)
            await asyncio.to_thread(handle.close)


def _hash_prefix(handle: IO[bytes], digest: Any, length: int) -> None:
    remaining = length
    while remaining:
        block = handle.read(min(remaining, 4 * 1024 * 1024))
        if not block:
            raise DataLoss("file shrank while being read")
        digest.update(block)
        remaining -= len(block)
