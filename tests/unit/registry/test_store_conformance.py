"""Every registry store keeps the same promises (run against the fake and the MLflow store).

Invariants: versions are numbered from 1 in order and read back exactly as written; a version is
added whole or not at all (a failure part-way leaves no record and no files); an idempotency key
returns the first version; alias moves are compare-and-sets whose history forms an unbroken chain
(each entry's ``from`` is the previous entry's ``to``) even under many concurrent moves, and the
alias always points at the last entry's ``to``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import uuid
from pathlib import Path

import pytest

from llmops.common.artifacts.manifest import manifest_sha256
from llmops.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from llmops.registry.domain import (
    DatasetRef,
    JobKind,
    Lineage,
    ManifestFile,
    ModelFormat,
    ModelRef,
    NewVersion,
    VersionStatus,
)
from llmops.registry.stores.base import RegistryStore, local_uri_path
from llmops.registry.stores.fake import FakeRegistryStore
from llmops.registry.stores.mlflow_store import MlflowRegistryStore


def _name() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


def _stage(folder: Path, files: dict[str, bytes]) -> tuple[Path, tuple[ManifestFile, ...]]:
    folder.mkdir(parents=True)
    entries = []
    for path, data in sorted(files.items()):
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entries.append(ManifestFile(path, len(data), hashlib.sha256(data).hexdigest()))
    return folder, tuple(entries)


def _new(name: str, manifest: tuple[ManifestFile, ...], **extra: object) -> NewVersion:
    fields: dict[str, object] = {
        "model_name": name,
        "format": ModelFormat.FP32,
        "status": VersionStatus.READY,
        "manifest": manifest,
        "manifest_sha256": manifest_sha256(manifest),
        "created_by": "tester",
    }
    fields.update(extra)
    return NewVersion(**fields)  # type: ignore[arg-type]


def _artifact_root(store: RegistryStore) -> Path:
    if isinstance(store, FakeRegistryStore):
        return store.artifact_root
    assert isinstance(store, MlflowRegistryStore)
    assert store.artifact_root is not None
    root = local_uri_path(store.artifact_root)
    assert root is not None
    return root


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


async def _add(store: RegistryStore, tmp_path: Path, name: str, **extra: object) -> int:
    staged, manifest = _stage(
        tmp_path / uuid.uuid4().hex, {"config.json": b"{}", "w/a.safetensors": b"x" * 10}
    )
    return (await store.add_version(_new(name, manifest, **extra), staged)).version


async def test_models_create_get_list(any_store: RegistryStore) -> None:
    prefix = _name()
    await any_store.create_model(f"{prefix}-b", "second", {"task": "chat"}, "alice")
    created = await any_store.create_model(f"{prefix}-a", "first", {"task": "code"}, "bob")
    assert (created.name, created.description, created.tags, created.created_by) == (
        f"{prefix}-a",
        "first",
        {"task": "code"},
        "bob",
    )
    assert (created.latest_version, created.version_count, created.aliases) == (0, 0, {})
    with pytest.raises(AlreadyExists):
        await any_store.create_model(f"{prefix}-a", "", {}, "bob")
    with pytest.raises(NotFound):
        await any_store.get_model(f"{prefix}-missing")
    listed = await any_store.list_models(name_prefix=prefix, tags={}, after="", limit=10)
    assert [m.name for m in listed] == [f"{prefix}-a", f"{prefix}-b"]
    chat = await any_store.list_models(name_prefix=prefix, tags={"task": "chat"}, after="", limit=10)
    assert [m.name for m in chat] == [f"{prefix}-b"]
    rest = await any_store.list_models(name_prefix=prefix, tags={}, after=f"{prefix}-a", limit=1)
    assert [m.name for m in rest] == [f"{prefix}-b"]


async def test_versions_read_back_exactly_and_in_order(any_store: RegistryStore, tmp_path: Path) -> None:
    name = _name()
    await any_store.create_model(name, "", {}, "tester")
    base = await _add(any_store, tmp_path, name)
    lineage = Lineage(
        parent=ModelRef(name, version=base),
        dataset=DatasetRef("data/sft.jsonl", "v1", "git@example:data.git"),
        dataset_commit="a" * 40,
        mlflow_run_id="run123",
        job_id="job-7",
        job_kind=JobKind.TRAINING,
    )
    files = {"config.json": b'{"a": 1}', "model.safetensors": b"\x00" * 100, "tok/tokenizer.json": b"{}"}
    staged, manifest = _stage(tmp_path / "v2", files)
    added = await any_store.add_version(
        _new(
            name,
            manifest,
            format=ModelFormat.ADAPTER,
            parameter_count=1234,
            base_model="org/base",
            adapter_base=ModelRef(name, version=base),
            lineage=lineage,
            metrics={"eval_loss": 1.25},
            tags={"team": "nlp"},
            description="an adapter",
        ),
        staged,
    )
    assert added.version == base + 1
    got = await any_store.get_version(name, added.version)
    assert got.status is VersionStatus.READY and got.format is ModelFormat.ADAPTER
    assert got.manifest == manifest and got.manifest_sha256 == manifest_sha256(manifest)
    assert (got.parameter_count, got.base_model, got.adapter_base) == (
        1234,
        "org/base",
        ModelRef(name, version=base),
    )
    assert got.lineage == lineage
    assert (got.metrics, got.tags, got.description, got.created_by) == (
        {"eval_loss": 1.25},
        {"team": "nlp"},
        "an adapter",
        "tester",
    )
    folder = await any_store.artifact_dir(got)
    assert {p: (folder / p).read_bytes() for p in files} == files
    newest_first = await any_store.list_versions(name, statuses=None, below=0, limit=10)
    assert [v.version for v in newest_first] == [base + 1, base]
    assert [
        v.version for v in await any_store.list_versions(name, statuses=None, below=base + 1, limit=10)
    ] == [base]
    model = await any_store.get_model(name)
    assert (model.latest_version, model.version_count) == (base + 1, 2)
    with pytest.raises(NotFound):
        await any_store.get_version(name, 99)


async def test_failed_version_is_recorded_without_files(any_store: RegistryStore) -> None:
    name = _name()
    await any_store.create_model(name, "", {}, "tester")
    failed = await any_store.add_version(
        _new(name, (), status=VersionStatus.FAILED, manifest_sha256="", failure_reason="sha mismatch"), None
    )
    got = await any_store.get_version(name, failed.version)
    assert (got.status, got.failure_reason, got.manifest, got.artifact_uri) == (
        VersionStatus.FAILED,
        "sha mismatch",
        (),
        "",
    )
    ready = await any_store.list_versions(name, statuses=frozenset({VersionStatus.READY}), below=0, limit=10)
    assert ready == []


async def test_failure_while_adding_leaves_no_version_and_no_files(
    any_store: RegistryStore, tmp_path: Path
) -> None:
    name = _name()
    await any_store.create_model(name, "", {}, "tester")
    before = _files_under(_artifact_root(any_store))
    staged, manifest = _stage(tmp_path / "broken", {"a.bin2": b"a" * 10})
    ghost = ManifestFile("z-missing.safetensors", 3, "0" * 64)  # listed, never staged: the move fails
    with pytest.raises(OSError):
        await any_store.add_version(_new(name, (*manifest, ghost)), staged)
    assert await any_store.list_versions(name, statuses=None, below=0, limit=10) == []
    assert _files_under(_artifact_root(any_store)) == before
    assert (await any_store.get_model(name)).version_count == 0


async def test_request_id_returns_the_first_version(any_store: RegistryStore, tmp_path: Path) -> None:
    name = _name()
    await any_store.create_model(name, "", {}, "tester")
    first = await _add(any_store, tmp_path, name, request_id="job-42")
    again = await _add(any_store, tmp_path, name, request_id="job-42")
    other = await _add(any_store, tmp_path, name, request_id="job-43")
    assert again == first and other == first + 1
    found = await any_store.find_request(name, "job-42")
    assert found is not None and found.version == first
    assert await any_store.find_request(name, "never") is None
    with pytest.raises(NotFound):
        await _add(any_store, tmp_path, _name())


async def test_alias_compare_and_set_and_history(any_store: RegistryStore, tmp_path: Path) -> None:
    name = _name()
    await any_store.create_model(name, "", {}, "tester")
    v1, v2 = await _add(any_store, tmp_path, name), await _add(any_store, tmp_path, name)
    created = await any_store.move_alias(name, "champion", v1, expected=0, moved_by="alice", reason="first")
    assert (created.from_version, created.to_version, created.moved_by) == (0, v1, "alice")
    with pytest.raises(FailedPrecondition):
        await any_store.move_alias(name, "champion", v2, expected=0, moved_by="bob", reason="")
    with pytest.raises(FailedPrecondition):
        await any_store.move_alias(name, "champion", v2, expected=v2, moved_by="bob", reason="")
    moved = await any_store.move_alias(name, "champion", v2, expected=v1, moved_by="bob", reason="better")
    assert (moved.from_version, moved.to_version) == (v1, v2)
    same = await any_store.move_alias(name, "champion", v2, expected=None, moved_by="carol", reason="")
    assert (same.from_version, same.to_version) == (v2, v2)  # no-op, not recorded
    resolved = await any_store.resolve_alias(name, "champion")
    assert (resolved.version, resolved.moved_at) == (v2, moved.moved_at)
    assert (await any_store.get_model(name)).aliases == {"champion": v2}
    assert (await any_store.get_version(name, v2)).aliases == ("champion",)
    with pytest.raises(NotFound):
        await any_store.move_alias(name, "challenger", 99, expected=None, moved_by="bob", reason="")
    deleted = await any_store.move_alias(
        name, "champion", None, expected=v2, moved_by="dave", reason="retire"
    )
    assert (deleted.from_version, deleted.to_version) == (v2, 0)
    with pytest.raises(NotFound):
        await any_store.move_alias(name, "champion", None, expected=None, moved_by="dave", reason="")
    with pytest.raises(NotFound):
        await any_store.resolve_alias(name, "champion")
    history = await any_store.alias_history(name, "champion", offset=0, limit=10)
    assert [(m.from_version, m.to_version, m.moved_by, m.reason) for m in history] == [
        (v2, 0, "dave", "retire"),
        (v1, v2, "bob", "better"),
        (0, v1, "alice", "first"),
    ]
    assert [m.to_version for m in await any_store.alias_history(name, "", offset=1, limit=1)] == [v2]
    with pytest.raises(NotFound):
        await any_store.alias_history(_name(), "", offset=0, limit=10)


async def test_concurrent_alias_moves_never_break_the_chain(any_store: RegistryStore, tmp_path: Path) -> None:
    name = _name()
    await any_store.create_model(name, "", {}, "tester")
    versions = [await _add(any_store, tmp_path, name) for _ in range(3)]
    rng = random.Random(7)
    moves = [
        any_store.move_alias(
            name, "champion", rng.choice(versions), expected=None, moved_by=f"w{i}", reason=""
        )
        for i in range(24)
    ]
    await asyncio.gather(*moves)
    # Compare-and-set from one known state: exactly one of the racers wins.
    current = (await any_store.resolve_alias(name, "champion")).version
    target = next(v for v in versions if v != current)
    racers = [
        any_store.move_alias(name, "champion", target, expected=current, moved_by=f"cas{i}", reason="")
        for i in range(8)
    ]
    results = await asyncio.gather(*racers, return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(e, FailedPrecondition) for e in losers)
    history = list(reversed(await any_store.alias_history(name, "champion", offset=0, limit=1000)))
    assert history[0].from_version == 0
    for before, after in itertools.pairwise(history):
        assert after.from_version == before.to_version, "alias history has a gap"
        assert before.from_version != before.to_version
    resolved = await any_store.resolve_alias(name, "champion")
    assert resolved.version == history[-1].to_version == target
    assert resolved.version in versions


async def test_alias_weights_compare_and_set_history_and_guards(
    any_store: RegistryStore, tmp_path: Path
) -> None:
    """Weights change by compare-and-set on a revision, name only existing aliases, and keep them."""
    name = _name()
    await any_store.create_model(name, "", {}, "tester")
    v1, v2 = await _add(any_store, tmp_path, name), await _add(any_store, tmp_path, name)
    never = await any_store.get_alias_weights(name)
    assert (never.revision, never.weights, never.set_at) == (0, {}, None)
    await any_store.move_alias(name, "champion", v1, expected=None, moved_by="t", reason="")
    with pytest.raises(FailedPrecondition, match="challenger"):  # the alias does not exist yet
        await any_store.set_alias_weights(
            name, {"champion": 90, "challenger": 10}, expected=0, set_by="alice", reason=""
        )
    await any_store.move_alias(name, "challenger", v2, expected=None, moved_by="t", reason="")
    first = await any_store.set_alias_weights(
        name, {"champion": 90, "challenger": 10}, expected=0, set_by="alice", reason="canary"
    )
    assert (first.revision, first.weights, first.previous_weights, first.set_by) == (
        1, {"champion": 90, "challenger": 10}, {}, "alice",
    )  # fmt: skip
    with pytest.raises(Aborted, match="revision 1"):  # a writer that read revision 0 lost
        await any_store.set_alias_weights(
            name, {"champion": 50, "challenger": 50}, expected=0, set_by="bob", reason=""
        )
    second = await any_store.set_alias_weights(
        name, {"champion": 50, "challenger": 50}, expected=1, set_by="bob", reason="half"
    )
    assert (second.revision, second.previous_weights) == (2, {"champion": 90, "challenger": 10})
    same = await any_store.set_alias_weights(
        name, {"champion": 50, "challenger": 50}, expected=None, set_by="carol", reason=""
    )
    assert (same.revision, same.set_by) == (2, "bob")  # no change, nothing recorded
    with pytest.raises(FailedPrecondition, match="weight 50"):  # a positive weight keeps its alias
        await any_store.move_alias(name, "challenger", None, expected=None, moved_by="dave", reason="")
    await any_store.set_alias_weights(
        name, {"champion": 100, "challenger": 0}, expected=2, set_by="e", reason=""
    )
    await any_store.move_alias(name, "challenger", None, expected=None, moved_by="dave", reason="retire")
    now = await any_store.get_alias_weights(name)
    assert (now.revision, now.weights) == (3, {"champion": 100, "challenger": 0})
    history = await any_store.alias_weights_history(name, offset=0, limit=10)
    assert [(h.revision, h.set_by, h.reason) for h in history] == [
        (3, "e", ""),
        (2, "bob", "half"),
        (1, "alice", "canary"),
    ]
    assert [h.revision for h in await any_store.alias_weights_history(name, offset=1, limit=1)] == [2]
    for call in (
        any_store.get_alias_weights(_name()),
        any_store.alias_weights_history(_name(), offset=0, limit=1),
        any_store.set_alias_weights(_name(), {"champion": 1}, expected=None, set_by="x", reason=""),
    ):
        with pytest.raises(NotFound):
            await call


async def test_concurrent_weight_changes_with_one_revision_have_one_winner(
    any_store: RegistryStore, tmp_path: Path
) -> None:
    name = _name()
    await any_store.create_model(name, "", {}, "tester")
    version = await _add(any_store, tmp_path, name)
    for alias in ("champion", "challenger"):
        await any_store.move_alias(name, alias, version, expected=None, moved_by="t", reason="")
    racers = [
        any_store.set_alias_weights(
            name, {"champion": 100 - i, "challenger": i}, expected=0, set_by=f"r{i}", reason=""
        )
        for i in range(1, 9)
    ]
    results = await asyncio.gather(*racers, return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, Aborted) for r in results if r not in winners)
    history = await any_store.alias_weights_history(name, offset=0, limit=10)
    assert [h.revision for h in history] == [1] and history[0].weights == winners[0].weights
