"""The node cache's byte budget: least recently used entries go, never one a process is serving.

Invariants: after a fill the cache is within ``max_bytes`` unless what is left is in use or just
filled; a hit makes an entry the most recent; an entry another process holds (a shared flock on its
use file) survives eviction, and becomes evictable once that process lets go; eviction never leaves
half an entry or a temporary folder behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llmops.common.artifacts.domain import ManifestFile
from llmops.common.artifacts.manifest import manifest_sha256
from llmops.common.artifacts.node_cache import COMPLETE_MARKER, NodeCache

SIZE = 4096


def version(name: str) -> tuple[str, tuple[ManifestFile, ...], bytes]:
    data = name.encode() * (SIZE // len(name))
    manifest = (ManifestFile("model.safetensors", len(data), hashlib.sha256(data).hexdigest()),)
    return manifest_sha256(manifest), manifest, data


A, B, C = version("a"), version("b"), version("c")


def writer(data: bytes) -> Callable[[Path], Awaitable[None]]:
    async def fill(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(data)

    return fill


async def put(
    cache: NodeCache, v: tuple[str, tuple[ManifestFile, ...], bytes], *, keep: bool = False
) -> bool:
    digest, manifest, data = v
    _, hit = await cache.get_or_fill(digest, manifest, writer(data))
    if not keep:
        cache.release(digest)
    return hit


def cached(cache: NodeCache) -> set[str]:
    return {p.name for p in (cache.root / "sha256").iterdir()}


def total_bytes(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root / "sha256") for f in fs)


def age(cache: NodeCache, digest: str, seconds_ago: float) -> None:
    marker = cache.entry_path(digest) / COMPLETE_MARKER
    then = marker.stat().st_mtime - seconds_ago
    os.utime(marker, (then, then))


def budget_for_two(tmp_path: Path) -> int:
    """Two entries fit, three do not (an entry is the weights plus its marker)."""
    probe = NodeCache(tmp_path / "probe")
    asyncio.run(put(probe, A))
    return 2 * total_bytes(probe.root) + 100


def test_budget_is_respected_after_fills(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=budget_for_two(tmp_path))

    async def scenario() -> None:
        for v in (A, B, C):
            assert not await put(cache, v)
            assert total_bytes(cache.root) <= cache.max_bytes
            await asyncio.sleep(0.01)  # distinct last-use times

    asyncio.run(scenario())
    assert cached(cache) == {B[0], C[0]}  # the oldest went
    assert not list((cache.root / "tmp").iterdir())


def test_a_recent_hit_moves_an_entry_to_the_back_of_the_line(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=budget_for_two(tmp_path))

    async def scenario() -> None:
        await put(cache, A)
        await put(cache, B)
        age(cache, A[0], 200)
        age(cache, B[0], 100)  # A is older than B ...
        assert await put(cache, A)  # ... until it is used again
        await put(cache, C)

    asyncio.run(scenario())
    assert cached(cache) == {A[0], C[0]}


def test_unbounded_cache_keeps_everything(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)

    async def scenario() -> None:
        for v in (A, B, C):
            await put(cache, v)

    asyncio.run(scenario())
    assert cached(cache) == {A[0], B[0], C[0]}


def _hold_in_process(root: str, digest: str, held: Any, go: Any) -> None:
    cache = NodeCache(Path(root))
    cache.hold(digest)
    held.set()
    go.wait(120)
    cache.release(digest)


def test_entry_in_use_by_another_process_is_kept_until_released(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=budget_for_two(tmp_path))
    asyncio.run(put(cache, A))
    asyncio.run(put(cache, B))
    age(cache, A[0], 200)
    age(cache, B[0], 100)
    context = multiprocessing.get_context("spawn")
    held, go = context.Event(), context.Event()
    proc = context.Process(target=_hold_in_process, args=(str(cache.root), A[0], held, go))
    proc.start()
    try:
        assert held.wait(120)
        with caplog.at_level(logging.INFO, logger="llmops.common.artifacts.node_cache"):
            asyncio.run(put(cache, C))
        assert cached(cache) == {A[0], C[0]}  # A, the oldest, is served elsewhere: B went instead
        assert (cache.entry_path(A[0]) / "model.safetensors").read_bytes() == A[2]
        asyncio.run(put(cache, B))  # over budget again, and A is still held
        assert cached(cache) == {A[0], B[0]}
        assert "in use" in caplog.text
    finally:
        go.set()
        proc.join(120)
    assert proc.exitcode == 0
    age(cache, A[0], 1000)
    cache.max_bytes = total_bytes(cache.root) - 1
    assert cache.evict() == [A[0]]  # released: now it can go
    assert cached(cache) == {B[0]}
    assert not list((cache.root / "tmp").iterdir())


def test_everything_in_use_exceeds_the_budget_without_failing_the_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = NodeCache(tmp_path / "cache", max_bytes=1)

    async def scenario() -> None:
        await put(cache, A, keep=True)
        with caplog.at_level(logging.WARNING, logger="llmops.common.artifacts.node_cache"):
            assert not await put(cache, B, keep=True)

    asyncio.run(scenario())
    assert cached(cache) == {A[0], B[0]}
    assert "exceed the budget" in caplog.text
    cache.close()
    assert sorted(cache.evict()) == sorted([A[0], B[0]])  # released: both go
    assert not cached(cache)
