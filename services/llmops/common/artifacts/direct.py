"""Reading a version's files straight from the artifact store, each verified against its sha256.

The registry's ``GetArtifactLocations`` says where every file is (:class:`DirectLocations`): a path
on a volume this process mounts, or a presigned HTTP(S) GET URL of an S3-compatible store.
:class:`DirectFetcher` copies them into a folder, hashing as it goes; a file whose size or sha256
does not match the manifest is DATA_LOSS and never appears in the folder. The registry process
carries none of the bytes, so N replicas loading a version cost the registry N small calls.

Downloads from URLs run several files at once (bounded), in worker threads (socket reads, file
writes and ``hashlib`` release the GIL), and log their progress. Failures are errors, never hangs:
a store that sends nothing for ``read_timeout`` seconds or cannot be reached is UNAVAILABLE; a URL
the store refuses (expired, revoked: HTTP 403) or an object missing from it (404) is
FAILED_PRECONDITION, and the caller may ask the registry for fresh locations.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from llmops.common.artifacts.domain import ManifestFile
from llmops.common.artifacts.manifest import check_path, local_path
from llmops.common.errors import Cancelled, DataLoss, FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

#: Bytes read at a time from a file or a response.
BLOCK_BYTES = 4 * 1024 * 1024
PART_SUFFIX = ".llmops-part"


class Access(Enum):
    SHARED_PATH = "shared_path"
    PRESIGNED_URL = "presigned_url"


@dataclass(frozen=True)
class DirectLocations:
    """Where one version's files are (the client's view of GetArtifactLocations)."""

    name: str
    version: int
    manifest_sha256: str
    access: Access
    #: SHARED_PATH: the prefix of every path as the registry sees it ("" when not under its root).
    shared_root: str
    #: (file, where): a path or a URL per manifest file.
    files: tuple[tuple[ManifestFile, str], ...]
    expires_at: datetime | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f, _ in self.files)

    @classmethod
    def from_proto(cls, response: Any) -> DirectLocations:
        """From a ``GetArtifactLocationsResponse``."""
        from llmops.proto.registry.v1 import registry_service_pb2 as pb

        access = (
            Access.SHARED_PATH if response.access == pb.ARTIFACT_ACCESS_SHARED_PATH else Access.PRESIGNED_URL
        )
        files = tuple(
            (
                ManifestFile(check_path(loc.file.path), loc.file.size_bytes, loc.file.sha256),
                loc.shared_path if access is Access.SHARED_PATH else loc.url,
            )
            for loc in response.files
        )
        expires = response.expires_at.ToDatetime() if response.HasField("expires_at") else None
        v = response.version
        return cls(v.name, int(v.version), v.manifest_sha256, access, response.shared_root, files, expires)


@dataclass
class _Progress:
    total: int
    files: int
    done: int = 0
    files_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n


class DirectFetcher:
    """Copies a version's files from the store into a folder, verified.

    Args:
        shared_mount: this process's mount of the registry's filesystem artifact store (replaces
            the registry's ``shared_root``); None reads the paths as given (same machine).
        concurrency: files downloaded from URLs at once.
        read_timeout: seconds a connection or read may wait for the store before UNAVAILABLE.
        progress_seconds: how often progress is logged while files arrive.
    """

    def __init__(
        self,
        *,
        shared_mount: Path | None = None,
        concurrency: int = 4,
        read_timeout: float = 60.0,
        progress_seconds: float = 5.0,
    ) -> None:
        self.shared_mount = shared_mount
        self.concurrency = concurrency
        self.read_timeout = read_timeout
        self.progress_seconds = progress_seconds

    def source_path(self, locations: DirectLocations, where: str) -> Path:
        """Where a file the registry names by ``where`` is on this machine."""
        if self.shared_mount is None:
            return Path(where)
        root = locations.shared_root
        if not root or not Path(where).is_relative_to(root):
            raise FailedPrecondition(
                f"{locations.name}:{locations.version} lies outside the registry's artifact root, so "
                f"serving.weights.shared_mount ({self.shared_mount}) cannot map {where}"
            )
        return self.shared_mount / Path(where).relative_to(root)

    async def fetch(self, locations: DirectLocations, destination: Path) -> None:
        """Write every file of ``locations`` under ``destination``, each verified.

        Raises:
            DataLoss: a file's size or sha256 differs from the manifest.
            FailedPrecondition: a file is missing from the store or its URL is refused.
            Unavailable: the store cannot be reached or stops sending.
        """
        label = f"{locations.name}:{locations.version}"
        progress = _Progress(locations.total_bytes, len(locations.files))
        stop = threading.Event()
        started = time.monotonic()
        reporter = asyncio.ensure_future(self._report(label, progress, started))
        limit = asyncio.Semaphore(self.concurrency if locations.access is Access.PRESIGNED_URL else 1)

        async def one(entry: ManifestFile, where: str) -> None:
            async with limit:
                await asyncio.to_thread(
                    self._fetch_file, locations, entry, where, destination, progress, stop
                )

        tasks = [asyncio.ensure_future(one(entry, where)) for entry, where in locations.files]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            stop.set()  # the other threads stop at their next block
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            reporter.cancel()
        elapsed = max(time.monotonic() - started, 1e-9)
        log.info(
            "fetched %s from the store (%s): %d files, %.1f MB in %.2f s (%.1f MB/s), verified",
            label,
            locations.access.value,
            len(locations.files),
            progress.total / 1e6,
            elapsed,
            progress.total / 1e6 / elapsed,
        )

    async def _report(self, label: str, progress: _Progress, started: float) -> None:
        while True:
            await asyncio.sleep(self.progress_seconds)
            elapsed = time.monotonic() - started
            log.info(
                "fetching %s: %.1f / %.1f MB (%.0f%%), %d / %d files, %.1f MB/s",
                label,
                progress.done / 1e6,
                progress.total / 1e6,
                100.0 * progress.done / max(progress.total, 1),
                progress.files_done,
                progress.files,
                progress.done / 1e6 / max(elapsed, 1e-9),
            )

    def _fetch_file(
        self,
        locations: DirectLocations,
        entry: ManifestFile,
        where: str,
        destination: Path,
        progress: _Progress,
        stop: threading.Event,
    ) -> None:
        final = local_path(destination, entry.path)
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + PART_SUFFIX)
        digest = hashlib.sha256()
        size = 0
        try:
            with self._open(locations, entry, where) as source, part.open("wb") as sink:
                while True:
                    if stop.is_set():
                        raise Cancelled("download stopped")
                    block = self._read(source, entry)
                    if not block:
                        break
                    digest.update(block)
                    sink.write(block)
                    size += len(block)
                    progress.add(len(block))
            if size != entry.size_bytes or digest.hexdigest() != entry.sha256:
                raise DataLoss(
                    f"{entry.path} of {locations.name}:{locations.version} read from the store does not "
                    f"match the manifest ({size} bytes, sha256 {digest.hexdigest()[:12]}...; expected "
                    f"{entry.size_bytes} bytes, {entry.sha256[:12]}...)"
                )
            os.replace(part, final)
            with progress.lock:
                progress.files_done += 1
        finally:
            part.unlink(missing_ok=True)

    def _open(self, locations: DirectLocations, entry: ManifestFile, where: str) -> Any:
        if locations.access is Access.SHARED_PATH:
            path = self.source_path(locations, where)
            try:
                return path.open("rb")
            except FileNotFoundError:
                raise FailedPrecondition(
                    f"{entry.path} of {locations.name}:{locations.version} is not at {path}: is the "
                    "artifact store mounted here (serving.weights.shared_mount)?"
                ) from None
            except PermissionError:
                raise FailedPrecondition(f"{path} is not readable by this process") from None
        what = f"{entry.path} of {locations.name}:{locations.version}"
        try:
            return urllib.request.urlopen(where, timeout=self.read_timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                raise FailedPrecondition(
                    f"the store refused the presigned URL of {what} (HTTP {exc.code}: expired or not "
                    "authorized); ask the registry for new locations"
                ) from None
            if exc.code == 404:
                raise FailedPrecondition(f"{what} is missing from the artifact store (HTTP 404)") from None
            raise Unavailable(f"the artifact store answered HTTP {exc.code} for {what}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unavailable(f"the artifact store is unreachable for {what}: {reason}") from None

    def _read(self, source: Any, entry: ManifestFile) -> bytes:
        try:
            data: bytes = source.read(BLOCK_BYTES)
            return data
        except TimeoutError:
            raise Unavailable(
                f"the artifact store sent nothing for {self.read_timeout:g} s while reading {entry.path}"
            ) from None
        except OSError as exc:
            raise Unavailable(f"reading {entry.path} from the artifact store failed: {exc}") from None
