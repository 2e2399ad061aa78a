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
filled. Hits and fills touch the marker, whose mtime is the entry's last use.

Eviction: with ``max_bytes`` > 0, after each fill the least recently used entries are removed until
the cache is within budget (never the entry just filled). A process serving an entry holds a shared
``fcntl`` lock on ``<root>/locks/<digest>.use`` (taken before the lookup, kept until
:meth:`NodeCache.release`); the evictor takes the digest's fill lock and an exclusive lock on the
use file, both without waiting, and skips the entry when either is held. An evicted entry is renamed
into ``<root>/tmp/`` before it is removed, so readers see a whole entry or none. When every entry
left is in use the budget stays exceeded (logged); a load never fails for it.
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

    def __init__(self, root: Path, *, max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes  # 0: unbounded
        self._locks: dict[str, asyncio.Lock] = {}
        self._uses: dict[str, list[int]] = {}  # digest -> [use-lock fd, holders in this process]

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

        ``fill`` writes (and verifies) every manifest file into the folder it is given. The entry is
        held in use (not evictable by any process) until :meth:`release` of ``digest``.

        Returns:
            (entry folder, True when it was already on the node).
        """
        check_sha256(digest, "manifest_sha256")
        await asyncio.to_thread(self.hold, digest)
        try:
            found, hit = await self._get_or_fill(digest, manifest, fill, label)
        except BaseException:
            self.release(digest)
            raise
        await asyncio.to_thread(_touch, found / COMPLETE_MARKER)
        if not hit:
            await asyncio.to_thread(self.evict, digest)
        return found, hit

    async def _get_or_fill(
        self, digest: str, manifest: Sequence[ManifestFile], fill: Fill, label: str
    ) -> tuple[Path, bool]:
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

    def hold(self, digest: str) -> None:
        """Mark ``digest``'s entry in use by this process (blocks only while an evictor removes it)."""
        used = self._uses.get(digest)
        if used is not None:
            used[1] += 1
            return
        locks_dir = self.root / "locks"
        locks_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(
            locks_dir / f"{check_sha256(digest, 'manifest_sha256')}.use", os.O_RDWR | os.O_CREAT, 0o644
        )
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)
        except BaseException:
            os.close(handle)
            raise
        self._uses[digest] = [handle, 1]

    def release(self, digest: str) -> None:
        """Undo one :meth:`hold` (or :meth:`get_or_fill`) of ``digest``; the last one frees the entry."""
        used = self._uses.get(digest)
        if used is None:
            return
        used[1] -= 1
        if used[1] <= 0:
            del self._uses[digest]
            os.close(used[0])  # releases the shared flock

    def close(self) -> None:
        """Release every entry this process holds."""
        for digest in list(self._uses):
            self._uses[digest][1] = 1
            self.release(digest)

    def evict(self, keep: str = "") -> list[str]:
        """Remove least recently used entries (not ``keep``, none in use) until within ``max_bytes``.

        Returns:
            the digests evicted.
        """
        if self.max_bytes <= 0:
            return []
        entries = []
        for entry in _glob(self.root / "sha256", "*"):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                last_use = (entry / COMPLETE_MARKER).stat().st_mtime
            except OSError:
                last_use = 0.0  # incomplete: oldest
            entries.append((last_use, entry.name, _size(entry)))
        total = sum(size for _, _, size in entries)
        evicted: list[str] = []
        in_use: list[str] = []
        for _, digest, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if digest == keep:
                continue
            if self._evict_one(digest):
                evicted.append(digest)
                total -= size
            else:
                in_use.append(digest)
        if evicted:
            log.info("node cache: evicted %s (least recently used)", ", ".join(d[:12] for d in evicted))
        if in_use:
            log.info("node cache: kept %s (in use)", ", ".join(d[:12] for d in in_use))
        if total > self.max_bytes:
            log.warning(
                "node cache: %d bytes exceed the budget of %d; the rest is in use or just filled",
                total,
                self.max_bytes,
            )
        return evicted

    def _evict_one(self, digest: str) -> bool:
        """Remove ``digest``'s entry unless a filler or a user holds it; False when it is held."""
        locks_dir = self.root / "locks"
        locks_dir.mkdir(parents=True, exist_ok=True)
        handles: list[int] = []
        try:
            for name in (f"{digest}.lock", f"{digest}.use"):
                handle = os.open(locks_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
                handles.append(handle)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
            trash = self.root / "tmp" / f"{digest}-evicted-{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.entry_path(digest).rename(trash)
            except FileNotFoundError:
                return True  # another evictor removed it meanwhile
        finally:
            for handle in handles:
                os.close(handle)
        shutil.rmtree(trash, ignore_errors=True)
        return True

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


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still serves; only its LRU order ages
        os.utime(path)


def _size(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def _glob(folder: Path, pattern: str) -> Iterator[Path]:
    with contextlib.suppress(FileNotFoundError):
        yield from folder.glob(pattern)
