"""The vocabulary of moving a model's files: a manifest entry, and the chunks of an upload and a download.

The registry streams these on its side of ``RegisterVersion`` / ``DownloadArtifact``; every client
that uploads or downloads (:mod:`.client`) speaks them too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ManifestFile:
    """One file of an artifact: path relative to its root ('/' separators), size, sha256 hex."""

    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class FileChunk:
    """A piece of one uploaded file."""

    path: str
    offset: int
    data: bytes
    last: bool


@dataclass(frozen=True)
class UploadSummary:
    """The client's manifest of what it sent."""

    files: tuple[ManifestFile, ...]


UploadPart = FileChunk | UploadSummary


@dataclass(frozen=True)
class DownloadChunk:
    """One chunk of one downloaded file (``sha256`` set only on a file's last chunk)."""

    path: str
    offset: int
    data: bytes
    file_size: int
    total_bytes: int
    bytes_sent: int
    sha256: str
    file_index: int
    file_count: int
