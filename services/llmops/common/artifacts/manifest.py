"""The sha256 manifest of an artifact: every file's path, size and hash, and one hash over them all.

The manifest is written when a version is registered and checked on every download. Its own hash
(``manifest_sha256``) is the SHA-256 of the lines ``"<sha256>  <path>\\n"`` sorted by path — the
format ``sha256sum -c`` reads — so one value changes if any file does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from llmops.common.artifacts.domain import ManifestFile
from llmops.common.errors import InvalidArgument

#: Bytes read at a time when hashing a file on disk.
HASH_BLOCK_BYTES = 4 * 1024 * 1024
#: Most files one version may hold (the manifest is stored in one MLflow tag of at most 100 kB).
MAX_FILES = 1000
MAX_PATH_BYTES = 512
_HEX = frozenset("0123456789abcdef")


def check_path(path: str, field: str = "path") -> str:
    """Return ``path`` if it is a safe relative artifact path, else raise ``InvalidArgument``.

    Safe: '/' separators, no empty, '.' or '..' parts, no leading '/', no backslash or NUL, at most
    512 bytes, and not hidden in a way a store could mistake for its own bookkeeping (no part
    starting with '.llmops').
    """
    if not path or len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(f"file path must be 1-{MAX_PATH_BYTES} bytes", field=field)
    if "\\" in path or "\x00" in path or path.startswith("/"):
        raise InvalidArgument(f"file path {path!r} must be relative with '/' separators", field=field)
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument(f"file path {path!r} must not contain empty, '.' or '..' parts", field=field)
    if any(part.startswith(".llmops") for part in parts):
        raise InvalidArgument(f"file path {path!r} uses the reserved prefix '.llmops'", field=field)
    return path


def check_sha256(value: str, field: str = "sha256") -> str:
    if len(value) != 64 or not set(value) <= _HEX:
        raise InvalidArgument("sha256 must be 64 lowercase hex characters", field=field)
    return value


def local_path(root: Path, path: str) -> Path:
    """Where manifest ``path`` lives under ``root`` (``path`` must already be checked)."""
    return root.joinpath(*PurePosixPath(path).parts)


def hash_file(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file on disk."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def scan_directory(root: Path) -> list[str]:
    """Manifest paths of every regular file under ``root``, sorted; symlinks are refused."""
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath, name)
            if full.is_symlink() or not full.is_file():
                raise InvalidArgument(f"{full.relative_to(root).as_posix()} is not a regular file")
            paths.append(check_path(full.relative_to(root).as_posix()))
        for name in dirnames:
            if Path(dirpath, name).is_symlink():
                raise InvalidArgument(f"{Path(dirpath, name).relative_to(root).as_posix()} is a symlink")
    return sorted(paths)


def build_manifest(root: Path) -> tuple[ManifestFile, ...]:
    """Hash every file under ``root`` (sorted by path)."""
    entries = []
    for path in scan_directory(root):
        size, sha = hash_file(local_path(root, path))
        entries.append(ManifestFile(path, size, sha))
    return tuple(entries)


def manifest_sha256(files: Iterable[ManifestFile]) -> str:
    """SHA-256 of ``"<sha256>  <path>\\n"`` lines sorted by path."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.path):
        digest.update(f"{entry.sha256}  {entry.path}\n".encode())
    return digest.hexdigest()


def differences(expected: Sequence[ManifestFile], actual: Sequence[ManifestFile]) -> list[str]:
    """Human-readable differences between two manifests; empty when they agree."""
    want = {f.path: f for f in expected}
    have = {f.path: f for f in actual}
    problems = [f"{path}: missing" for path in sorted(want.keys() - have.keys())]
    problems += [f"{path}: not in the summary" for path in sorted(have.keys() - want.keys())]
    for path in sorted(want.keys() & have.keys()):
        w, h = want[path], have[path]
        if w.size_bytes != h.size_bytes:
            problems.append(f"{path}: {h.size_bytes} bytes, expected {w.size_bytes}")
        elif w.sha256 != h.sha256:
            problems.append(f"{path}: sha256 {h.sha256[:12]}..., expected {w.sha256[:12]}...")
    return problems


def to_json(files: Iterable[ManifestFile]) -> str:
    """Compact JSON: ``[[path, size, sha256], ...]`` sorted by path."""
    rows = [[f.path, f.size_bytes, f.sha256] for f in sorted(files, key=lambda f: f.path)]
    return json.dumps(rows, separators=(",", ":"))


def from_json(text: str) -> tuple[ManifestFile, ...]:
    """Inverse of :func:`to_json`."""
    return tuple(ManifestFile(str(p), int(s), str(h)) for p, s, h in json.loads(text))


def to_sha256sum(files: Iterable[ManifestFile]) -> str:
    """The manifest as ``sha256sum -c`` input (what :func:`manifest_sha256` hashes)."""
    return "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
