"""The node-local weights cache: one entry per manifest digest, whole or absent, filled once per node.

Invariants: a filled entry is found again by any process (a restarted pod, a second pod); two
processes asking for the same missing digest at once fill it once and both get the same folder; a
fill that fails leaves no entry and no temporary folder, and the next one succeeds; an entry whose
files were damaged (wrong size) is not served and is refilled.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import time
from pathlib import Path

import pytest

from llmops.common.artifacts.domain import ManifestFile
from llmops.common.artifacts.manifest import manifest_sha256
from llmops.common.artifacts.node_cache import COMPLETE_MARKER, NodeCache

FILES = {"config.json": b'{"a": 1}', "weights/model.safetensors": b"w" * 4096}
MANIFEST = tuple(
    ManifestFile(path, len(data), hashlib.sha256(data).hexdigest()) for path, data in sorted(FILES.items())
)
DIGEST = manifest_sha256(MANIFEST)


async def write_files(folder: Path, log: Path | None = None, delay: float = 0.0) -> None:
    if log is not None:
        with log.open("a") as handle:
            handle.write("fill\n")
    await asyncio.sleep(delay)  # a slow download: the other process arrives meanwhile
    for path, data in FILES.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)


async def test_filled_entry_is_found_by_a_new_cache_object(tmp_path: Path) -> None:
    first, hit = await NodeCache(tmp_path).get_or_fill(DIGEST, MANIFEST, write_files)
    assert not hit and (first / COMPLETE_MARKER).is_file()
    assert (first / "weights/model.safetensors").read_bytes() == FILES["weights/model.safetensors"]

    async def must_not_fill(folder: Path) -> None:
        raise AssertionError("the node already holds this digest")

    again, hit = await NodeCache(tmp_path).get_or_fill(DIGEST, MANIFEST, must_not_fill)
    assert hit and again == first
    assert not list((tmp_path / "tmp").iterdir())


def _fill_in_process(root: str, log: str, out: str) -> None:
    path, hit = asyncio.run(
        NodeCache(Path(root)).get_or_fill(DIGEST, MANIFEST, lambda f: write_files(f, Path(log), 1.0))
    )
    Path(out).write_text(f"{path}|{hit}")


def test_two_processes_fill_a_digest_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    log = tmp_path / "fills.log"
    procs = [
        context.Process(
            target=_fill_in_process, args=(str(tmp_path / "cache"), str(log), str(tmp_path / f"out{i}"))
        )
        for i in range(2)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + 120
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 1))
        assert proc.exitcode == 0
    assert log.read_text() == "fill\n"  # the second process waited for the first and used its entry
    results = sorted((tmp_path / f"out{i}").read_text() for i in range(2))
    entry = str(NodeCache(tmp_path / "cache").entry_path(DIGEST))
    assert results == [f"{entry}|False", f"{entry}|True"]


async def test_failed_fill_leaves_nothing_and_the_next_succeeds(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)

    async def broken(folder: Path) -> None:
        (folder / "config.json").write_bytes(b"partial")
        raise ConnectionError("store went away")

    with pytest.raises(ConnectionError):
        await cache.get_or_fill(DIGEST, MANIFEST, broken)
    assert not cache.entry_path(DIGEST).exists()
    assert not list((tmp_path / "tmp").iterdir())
    entry, hit = await cache.get_or_fill(DIGEST, MANIFEST, write_files)
    assert not hit and (entry / "config.json").read_bytes() == FILES["config.json"]


async def test_damaged_entry_is_refilled(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    entry, _ = await cache.get_or_fill(DIGEST, MANIFEST, write_files)
    (entry / "weights/model.safetensors").write_bytes(b"truncated")
    assert cache.lookup(DIGEST, MANIFEST) is None
    fills: list[Path] = []

    async def refill(folder: Path) -> None:
        fills.append(folder)
        await write_files(folder)

    again, hit = await cache.get_or_fill(DIGEST, MANIFEST, refill)
    assert not hit and len(fills) == 1 and again == entry
    assert (again / "weights/model.safetensors").read_bytes() == FILES["weights/model.safetensors"]


def test_digest_must_be_a_sha256(tmp_path: Path) -> None:
    from llmops.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        NodeCache(tmp_path).entry_path("../../etc")
