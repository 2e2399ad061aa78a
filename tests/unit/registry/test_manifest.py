"""The sha256 manifest: safe paths only, and a manifest hash that ``sha256sum -c`` agrees with.

Invariants: paths that could escape the artifact folder (``..``, absolute, backslashes, NUL) or
collide with store bookkeeping are refused; the manifest hash covers every file's path and sha256
in path order, so changing, adding or renaming any file changes it; differences name each file.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from llmops.common.artifacts.manifest import (
    build_manifest,
    check_path,
    differences,
    from_json,
    manifest_sha256,
    scan_directory,
    to_json,
    to_sha256sum,
)
from llmops.common.errors import InvalidArgument
from llmops.registry.domain import ManifestFile


@pytest.mark.parametrize("path", ["config.json", "tokenizer/tokenizer.json", "a.b-c_d/e f.txt"])
def test_safe_paths_pass(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\\b", "a\x00b", ".llmops-part/x", "x" * 600],
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidArgument):
        check_path(path)


def test_manifest_hash_is_what_sha256sum_checks(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"bee")
    (tmp_path / "sub" / "a.txt").write_bytes(b"")
    files = build_manifest(tmp_path)
    assert [f.path for f in files] == ["b.txt", "sub/a.txt"]
    assert files[0] == ManifestFile("b.txt", 3, hashlib.sha256(b"bee").hexdigest())
    text = to_sha256sum(files)
    assert manifest_sha256(files) == hashlib.sha256(text.encode()).hexdigest()
    assert manifest_sha256(reversed(files)) == manifest_sha256(files)
    if shutil.which("sha256sum"):
        (tmp_path / "SHA256SUMS").write_text(text)
        subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=tmp_path, check=True)
    renamed = (ManifestFile("c.txt", 3, files[0].sha256), files[1])
    assert manifest_sha256(renamed) != manifest_sha256(files)
    assert from_json(to_json(files)) == files


def test_differences_name_every_file() -> None:
    a = ManifestFile("a", 1, "1" * 64)
    b = ManifestFile("b", 2, "2" * 64)
    changed = ManifestFile("b", 2, "3" * 64)
    resized = ManifestFile("b", 5, "2" * 64)
    extra = ManifestFile("c", 1, "4" * 64)
    assert differences([a, b], [a, b]) == []
    assert differences([a, b], [a]) == ["b: missing"]
    assert differences([a], [a, extra]) == ["c: not in the summary"]
    assert "sha256" in differences([b], [changed])[0]
    assert "5 bytes" in differences([b], [resized])[0]


def test_symlinks_are_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        scan_directory(tmp_path)
