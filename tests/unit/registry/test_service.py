"""Registry logic on the in-memory store: registration is all or nothing, downloads are verified.

Invariants: a registered version is READY, numbered, with the manifest of exactly what arrived and
its parameter count read from the weights; a stream that breaks, a store that fails mid-commit or a
bad artifact leaves no version, no files and no staging leftovers; a summary that disagrees with
the upload is DATA_LOSS and leaves a FAILED record without files; a retried request id returns the
first version; a corrupt file is never completed in a download (DATA_LOSS before its last chunk);
lineage follows parents to the root; page tokens walk every item once.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmops.common.artifacts.manifest import build_manifest
from llmops.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from llmops.registry.domain import (
    DownloadChunk,
    DownloadRequest,
    FileChunk,
    Lineage,
    ModelFormat,
    ModelRef,
    UploadPart,
    UploadSummary,
    VersionSpec,
    VersionStatus,
)
from llmops.registry.service import RegistryService
from llmops.registry.stores.fake import FakeRegistryStore
from tests.registry_support import upload_parts, write_adapter


def _spec(name: str = "tiny", **extra: object) -> VersionSpec:
    fields: dict[str, object] = {"model_name": name, "format": ModelFormat.FP32, "create_model": True}
    fields.update(extra)
    return VersionSpec(**fields)  # type: ignore[arg-type]


async def _register(service: RegistryService, folder: Path, **extra: object):  # type: ignore[no-untyped-def]
    return await service.register_version(_spec(**extra), upload_parts(folder), "tester")


def _leftovers(service: RegistryService) -> list[Path]:
    store = service.store
    assert isinstance(store, FakeRegistryStore)
    files = [p for p in service.staging_dir.rglob("*")]
    if store.artifact_root.exists():
        files += [p for p in store.artifact_root.rglob("*") if p.is_file()]
    return files


async def _collect(stream: AsyncIterator[DownloadChunk]) -> list[DownloadChunk]:
    return [chunk async for chunk in stream]


async def test_register_reads_back_with_manifest_and_parameter_count(
    service: RegistryService, llama_dir: Path
) -> None:
    version = await _register(service, llama_dir, aliases=("champion",), metrics={"eval_loss": 2.5})
    assert (version.name, version.version, version.status, version.aliases) == (
        "tiny",
        1,
        VersionStatus.READY,
        ("champion",),
    )
    assert version.manifest == build_manifest(llama_dir)
    assert version.parameter_count == 22688  # the tiny Llama with tied embeddings
    assert service.metrics.versions_registered.labels("safetensors")._value.get() == 1
    second = await _register(service, llama_dir)
    assert second.version == 2
    latest = await service.get_version(ModelRef("tiny"))
    assert latest.version == 2
    by_alias = await service.get_version(ModelRef("tiny", alias="champion"))
    assert by_alias.version == 1
    assert list(service.staging_dir.iterdir()) == []


@pytest.mark.parametrize("stop_after", [0, 40_000])
async def test_broken_stream_leaves_nothing(
    service: RegistryService, llama_dir: Path, stop_after: int
) -> None:
    with pytest.raises(ConnectionResetError):
        await service.register_version(
            _spec(), upload_parts(llama_dir, stop_after_bytes=stop_after), "tester"
        )
    assert _leftovers(service) == []
    with pytest.raises(NotFound):
        await service.get_model("tiny")  # create_model waited for a complete upload


async def test_store_failure_during_commit_leaves_nothing(service: RegistryService, llama_dir: Path) -> None:
    store = service.store
    assert isinstance(store, FakeRegistryStore)
    store.fail_next_add = OSError("disk went away")
    with pytest.raises(OSError):
        await _register(service, llama_dir)
    assert _leftovers(service) == []
    assert (await service.get_model("tiny")).version_count == 0


async def test_summary_mismatch_is_data_loss_with_a_failed_record(
    service: RegistryService, llama_dir: Path
) -> None:
    async def lying_parts() -> AsyncIterator[UploadPart]:
        async for part in upload_parts(llama_dir):
            if isinstance(part, UploadSummary):
                first = dataclasses.replace(part.files[0], sha256="0" * 64)
                part = UploadSummary((first, *part.files[1:]))
            yield part

    with pytest.raises(DataLoss, match="does not match its summary"):
        await service.register_version(_spec(request_id="r1"), lying_parts(), "tester")
    failed = await service.store.get_version("tiny", 1)
    assert (
        failed.status is VersionStatus.FAILED and failed.manifest == () and "sha256" in failed.failure_reason
    )
    assert _leftovers(service) == []
    assert service.metrics.verification_failures._value.get() == 1
    retried = await _register(service, llama_dir, request_id="r1")  # a failure does not consume the key
    assert retried.version == 2 and retried.status is VersionStatus.READY
    with pytest.raises(FailedPrecondition):
        await service.set_alias("tiny", "champion", 1, expected=None, reason="", caller="x")


async def test_request_id_makes_a_retry_return_the_first_version(
    service: RegistryService, llama_dir: Path
) -> None:
    first = await _register(service, llama_dir, request_id="train-job-1")
    retry = await _register(service, llama_dir, request_id="train-job-1")
    assert retry.version == first.version == 1
    assert (await service.get_model("tiny")).version_count == 1


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([FileChunk("config.json", 5, b"{}", True)], "offset 0"),
        ([FileChunk("../evil", 0, b"x", True)], "'..'"),
        ([FileChunk("/abs", 0, b"x", True)], "relative"),
        ([FileChunk("a", 0, b"x", False), FileChunk("b", 0, b"y", True)], "without a chunk marked last"),
        ([FileChunk("a", 0, b"x", False)], "ended before"),
        ([FileChunk("a", 0, b"x", True), FileChunk("a", 0, b"x", True)], "sent twice"),
        ([FileChunk("a", 0, b"x", False), FileChunk("a", 3, b"x", True)], "expected 1"),
        ([FileChunk("a", 0, b"x" * (3 * 1024 * 1024 + 1), True)], "exceeds"),
        ([FileChunk("a", 0, b"x", True), FileChunk("a/b", 0, b"x", True)], "clashes"),
        ([UploadSummary(()), FileChunk("a", 0, b"x", True)], "last message"),
        ([], "no files"),
    ],
)
async def test_bad_chunk_sequences_are_invalid(
    service: RegistryService, parts: list[UploadPart], message: str
) -> None:
    async def stream() -> AsyncIterator[UploadPart]:
        for part in parts:
            yield part

    with pytest.raises(InvalidArgument, match=message):
        await service.register_version(_spec(), stream(), "tester")
    assert _leftovers(service) == []


async def test_bad_artifacts_are_rejected_with_the_reason(
    service: RegistryService, llama_dir: Path, tmp_path: Path
) -> None:
    broken = shutil.copytree(llama_dir, tmp_path / "broken")
    (broken / "config.json").unlink()
    with pytest.raises(InvalidArgument, match=r"config\.json is missing"):
        await _register(service, broken)
    assert _leftovers(service) == []


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        ({"format": None}, InvalidArgument, "format is required"),
        ({"model_name": "Bad Name"}, InvalidArgument, "model name"),
        ({"create_model": False, "model_name": "absent"}, NotFound, "absent"),
        ({"format": ModelFormat.ADAPTER}, InvalidArgument, "adapter_base"),
        ({"adapter_base": ModelRef("tiny", version=1)}, InvalidArgument, "adapter_base"),
        ({"tags": {"llmops.format": "x"}}, InvalidArgument, "reserved"),
        ({"aliases": ("latest",)}, InvalidArgument, "reserved"),
        ({"metrics": {"loss": float("nan")}}, InvalidArgument, "finite"),
        ({"source_uri": "ftp://host/x"}, InvalidArgument, "scheme"),
        ({"lineage": Lineage(parent=ModelRef("other", version=9))}, NotFound, "other"),
    ],
)
async def test_bad_metadata_is_refused_before_upload(
    service: RegistryService, llama_dir: Path, extra: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await _register(service, llama_dir, **extra)


async def test_adapter_registers_against_a_resolved_base(
    service: RegistryService, llama_dir: Path, tmp_path: Path
) -> None:
    await _register(service, llama_dir, aliases=("champion",))
    adapter = await _register(
        service,
        write_adapter(tmp_path / "adapter"),
        model_name="tiny-lora",
        format=ModelFormat.ADAPTER,
        adapter_base=ModelRef("tiny", alias="champion"),
        lineage=Lineage(parent=ModelRef("tiny", alias="champion")),
    )
    assert adapter.adapter_base == ModelRef("tiny", version=1)  # stored as a version, never an alias
    assert adapter.lineage.parent == ModelRef("tiny", version=1)
    assert adapter.parameter_count == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)


async def test_register_from_source_uri(service: RegistryService, llama_dir: Path) -> None:
    version = await service.register_version(_spec(source_uri=llama_dir.as_uri()), _no_parts(), "tester")
    assert version.manifest == build_manifest(llama_dir)


async def _no_parts() -> AsyncIterator[UploadPart]:
    return
    yield  # pragma: no cover


async def test_download_is_verified_and_a_corrupt_file_is_never_completed(
    service: RegistryService, llama_dir: Path
) -> None:
    version = await _register(service, llama_dir)
    chunks = await _collect(
        service.download(DownloadRequest(ModelRef("tiny", version=1), chunk_size_bytes=16_384))
    )
    by_file: dict[str, bytes] = {}
    for chunk in chunks:
        by_file[chunk.path] = by_file.get(chunk.path, b"") + chunk.data
    assert by_file == {f.path: (llama_dir / f.path).read_bytes() for f in version.manifest}
    assert [c.sha256 for c in chunks if c.sha256] == [f.sha256 for f in version.manifest]
    assert chunks[-1].bytes_sent == chunks[-1].total_bytes == version.size_bytes

    stored = await service.store.artifact_dir(version) / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    received: list[DownloadChunk] = []
    with pytest.raises(DataLoss, match=r"model\.safetensors"):
        async for chunk in service.download(
            DownloadRequest(ModelRef("tiny", version=1), chunk_size_bytes=16_384)
        ):
            received.append(chunk)
    assert not any(c.path == "model.safetensors" and c.sha256 for c in received)
    assert service.metrics.verification_failures._value.get() == 1


async def test_download_selection_and_resume(service: RegistryService, llama_dir: Path) -> None:
    version = await _register(service, llama_dir)
    ref = ModelRef("tiny", version=version.version)
    only = await _collect(service.download(DownloadRequest(ref, paths=("config.json",))))
    assert {c.path for c in only} == {"config.json"}
    data = (llama_dir / "model.safetensors").read_bytes()
    resumed = await _collect(
        service.download(DownloadRequest(ref, resume_path="model.safetensors", resume_offset=1000))
    )
    tail = b"".join(c.data for c in resumed if c.path == "model.safetensors")
    assert tail == data[1000:] and resumed[0].offset == 1000
    assert next(c for c in resumed if c.sha256).sha256 == version.manifest[1].sha256
    with pytest.raises(NotFound):
        await _collect(service.download(DownloadRequest(ref, paths=("nope.txt",))))
    with pytest.raises(InvalidArgument):
        await _collect(service.download(DownloadRequest(ref, chunk_size_bytes=4 * 1024 * 1024)))
    with pytest.raises(InvalidArgument):
        await _collect(
            service.download(DownloadRequest(ref, resume_path="model.safetensors", resume_offset=10**9))
        )


async def test_lineage_follows_parents_to_the_root(service: RegistryService, llama_dir: Path) -> None:
    await _register(service, llama_dir, model_name="base")
    await _register(
        service, llama_dir, model_name="tuned", lineage=Lineage(parent=ModelRef("base", version=1))
    )
    await _register(service, llama_dir, model_name="quant", lineage=Lineage(parent=ModelRef("tuned")))
    chain = await service.lineage(ModelRef("quant", version=1), max_depth=0)
    assert [(v.name, v.version) for v in chain.versions] == [("quant", 1), ("tuned", 1), ("base", 1)]
    assert not chain.truncated
    short = await service.lineage(ModelRef("quant", version=1), max_depth=2)
    assert len(short.versions) == 2 and short.truncated
    with pytest.raises(InvalidArgument):
        await service.lineage(ModelRef("quant"), max_depth=-1)


async def test_page_tokens_walk_every_item_once(service: RegistryService, llama_dir: Path) -> None:
    for name in ("a1", "a2", "a3", "b1"):
        await service.create_model(name, "", {}, "tester")
    seen, token = [], ""
    while True:
        page = await service.list_models(page_size=2, page_token=token, name_prefix="a", tags={})
        seen += [m.name for m in page.items]
        token = page.next_token
        if not token:
            break
    assert seen == ["a1", "a2", "a3"]
    for _ in range(3):
        await _register(service, llama_dir)
    first = await service.list_versions("tiny", page_size=2, page_token="", statuses=None)
    second = await service.list_versions("tiny", page_size=2, page_token=first.next_token, statuses=None)
    assert [v.version for v in first.items + second.items] == [3, 2, 1] and second.next_token == ""
    with pytest.raises(InvalidArgument):
        await service.list_models(page_size=2, page_token="garbage!", name_prefix="", tags={})
    with pytest.raises(InvalidArgument):
        await service.list_models(page_size=1001, page_token="", name_prefix="", tags={})
