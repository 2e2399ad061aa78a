"""A node-local cache of versions' files, keyed by the manifest's sha256.

Every serving process on a node points at the same folder (a hostPath in the chart), so a restarted
or reloaded pod, or a second pod of the same version, finds the files the node already holds and
loads without downloading. The key is the manifest digest, not the name: one entry per distinct set
of bytes, and a changed artifact can never be mistaken for a cached one.

Layout: ``<root>/sha256/<digest>/`` holds the files and, last, ``.llmops-complete.json`` (the
manifest). An entry is filled in ``<root>/tmp/<digest>-<pid>-<random>/`` and renamed into place
only once every file is verified and the marker written, so readers see a whole entry or none. Two
processes filling the same digest at once take turns on an ``fcntl`` lock file
(``<root>/locks/<digest>.lock``): the second finds the entry complete and uses it. A process that
dies while filling releases the lock with its file descriptors; its temporary folder is removed by
the next filler of that digest.

A hit checks the marker and every file's size (cheap); the bytes were hashed when the entry was
filled. Entries are never evicted here: size the volume for the versions a node serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

from llmops.common.artifacts.domain import ManifestFile
from llmops.common.artifacts.manifest import check_sha256, local_path

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".llmops-complete.json"

Fill = Callable[[Path], Awaitable[None]]


class NodeCache:
    """Versions' files under ``root``, one entry per manifest digest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._locks: dict[str, asyncio.Lock] = {}

    def entry_path(self, digest: str) -> Path:
        return self.root / "sha256" / check_sha256(digest, "manifest_sha256")

    def lookup(self, digest: str, manifest: Sequence[ManifestFile]) -> Path | None:
        """The complete entry of ``digest`` holding ``manifest``'s files, or None."""
        entry = self.entry_path(digest)
        try:
            marker = json.loads((entry / COMPLETE_MARKER).read_text())
        except (OSError, ValueError):
            return None
        if marker.get("manifest_sha256") != digest:
            return None
        for f in manifest:
            try:
                if local_path(entry, f.path).stat().st_size != f.size_bytes:
                    return None
            except OSError:
                return None
        return entry

    async def get_or_fill(
        self, digest: str, manifest: Sequence[ManifestFile], fill: Fill, *, label: str = ""
    ) -> tuple[Path, bool]:
        """The entry of ``digest``, filled by ``fill(folder)`` when the node lacks it.

        ``fill`` writes (and verifies) every manifest file into the folder it is given.

        Returns:
            (entry folder, True when it was already on the node).
        """
        found = await asyncio.to_thread(self.lookup, digest, manifest)
        if found is not None:
            log.info("node cache hit for %s (manifest %s...)", label or digest, digest[:12])
            return found, True
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:  # one filler per process; the file lock orders processes
            locks_dir = self.root / "locks"
            await asyncio.to_thread(locks_dir.mkdir, parents=True, exist_ok=True)
            handle = await asyncio.to_thread(
                os.open, locks_dir / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644
            )
            try:
                await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
                found = await asyncio.to_thread(self.lookup, digest, manifest)
                if found is not None:
                    log.info("node cache: %s was filled by another process meanwhile", label or digest)
                    return found, True
                return await self._fill(digest, manifest, fill, label), False
            finally:
                os.close(handle)  # releases the flock

    async def _fill(self, digest: str, manifest: Sequence[ManifestFile], fill: Fill, label: str) -> Path:
        tmp_root = self.root / "tmp"
        await asyncio.to_thread(self._remove_leftovers, tmp_root, digest)
        staging = tmp_root / f"{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(staging.mkdir, parents=True)
        try:
            await fill(staging)
            marker = {
                "manifest_sha256": digest,
                "label": label,
                "files": [[f.path, f.size_bytes, f.sha256] for f in manifest],
            }
            await asyncio.to_thread((staging / COMPLETE_MARKER).write_text, json.dumps(marker))
            entry = self.entry_path(digest)
            await asyncio.to_thread(self._move_into_place, staging, entry)
            log.info("node cache: stored %s as %s", label or digest, entry)
            return entry
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    @staticmethod
    def _remove_leftovers(tmp_root: Path, digest: str) -> None:
        """Folders of earlier fills of ``digest`` that died (the caller holds the digest's lock)."""
        for stale in _glob(tmp_root, f"{digest}-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def _move_into_place(staging: Path, entry: Path) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        if entry.exists():  # an incomplete or damaged entry (the lookup refused it): set it aside first
            trash = entry.with_name(f".{entry.name}-{uuid.uuid4().hex[:8]}.old")
            entry.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(entry)


def _glob(folder: Path, pattern: str) -> Iterator[Path]:
    with contextlib.suppress(FileNotFoundError):
        yield from folder.glob(pattern)
