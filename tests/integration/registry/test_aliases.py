"""Alias moves through a real server on MLflow stay atomic under concurrency.

Invariants: with many SetAlias calls racing, every call either succeeds or loses a compare-and-set
cleanly; the alias always points at a READY version; the recorded history is an unbroken chain
whose last entry is where the alias points — in our API and in MLflow's own alias table (what the
MLflow UI shows); lineage returns the chain to the root.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import grpc
import pytest

from llmops.common.artifacts.client import upload_directory
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from tests.integration.registry.conftest import RunningRegistry

FP32 = model_pb2.MODEL_FORMAT_FP32


async def _history(registry: RunningRegistry, name: str, alias: str) -> list[pb.AliasHistoryEntry]:
    entries: list[pb.AliasHistoryEntry] = []
    token = ""
    while True:
        page = await registry.client.unary(
            registry.client.stub.ListAliasHistory,
            pb.ListAliasHistoryRequest(model_name=name, alias=alias, page_size=7, page_token=token),
        )
        entries += page.entries
        token = page.next_page_token
        if not token:
            return list(reversed(entries))  # oldest first


async def test_concurrent_alias_moves_never_dangle(registry: RunningRegistry, llama_dir: Path) -> None:
    client = registry.client
    meta = pb.VersionMetadata(model_name="racy", create_model=True, format=FP32)
    versions = [(await upload_directory(client, meta, llama_dir)).version for _ in range(3)]
    rng = random.Random(3)

    async def move(i: int) -> None:
        request = pb.SetAliasRequest(
            model_name="racy", alias="champion", version=rng.choice(versions), reason=f"r{i}"
        )
        await client.unary(client.stub.SetAlias, request)

    await asyncio.gather(*(move(i) for i in range(40)))
    current = (
        await client.unary(
            client.stub.ResolveAlias, pb.ResolveAliasRequest(model_name="racy", alias="champion")
        )
    ).model.version
    target = next(v for v in versions if v != current)

    async def compare_and_set() -> grpc.StatusCode:
        request = pb.SetAliasRequest(
            model_name="racy", alias="champion", version=target, expected_current_version=current
        )
        try:
            await client.stub.SetAlias(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(compare_and_set() for _ in range(10)))
    assert codes.count(grpc.StatusCode.OK) == 1
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}

    history = await _history(registry, "racy", "champion")
    assert history[0].from_version == 0
    for before, after in itertools.pairwise(history):
        assert after.from_version == before.to_version
    resolved = await client.unary(
        client.stub.ResolveAlias, pb.ResolveAliasRequest(model_name="racy", alias="champion")
    )
    assert resolved.model.version == history[-1].to_version == target
    assert resolved.moved_at == history[-1].moved_at
    version = await client.unary(
        client.stub.GetVersion, pb.GetVersionRequest(model=model_pb2.ModelRef(name="racy", alias="champion"))
    )
    assert version.version.status == pb.VERSION_STATUS_READY and list(version.version.aliases) == ["champion"]

    from mlflow import MlflowClient

    uri = registry.settings.mlflow_tracking_uri
    assert MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model("racy").aliases == {
        "champion": target
    }

    deleted = await client.unary(
        client.stub.DeleteAlias, pb.DeleteAliasRequest(model_name="racy", alias="champion", reason="done")
    )
    assert (deleted.entry.from_version, deleted.entry.to_version) == (target, 0)
    model = await client.unary(client.stub.GetModel, pb.GetModelRequest(name="racy"))
    assert dict(model.model.aliases) == {} and model.model.version_count == 3


async def test_lineage_chain_to_the_root(registry: RunningRegistry, llama_dir: Path) -> None:
    client = registry.client
    base = await upload_directory(
        client,
        pb.VersionMetadata(model_name="base", create_model=True, format=FP32, aliases=["champion"]),
        llama_dir,
    )
    tuned_meta = pb.VersionMetadata(model_name="tuned", create_model=True, format=FP32)
    tuned_meta.lineage.parent.CopyFrom(model_pb2.ModelRef(name="base", alias="champion"))
    tuned_meta.lineage.mlflow_run_id = "abc123"
    tuned_meta.lineage.dataset.path = "data/sft.jsonl"
    tuned = await upload_directory(client, tuned_meta, llama_dir)
    assert tuned.lineage.parent == model_pb2.ModelRef(name="base", version=base.version)
    chain = await client.unary(
        client.stub.GetLineage, pb.GetLineageRequest(model=model_pb2.ModelRef(name="tuned"))
    )
    assert [(v.name, v.version) for v in chain.versions] == [("tuned", tuned.version), ("base", base.version)]
    assert not chain.truncated
    assert chain.versions[0].lineage.mlflow_run_id == "abc123"


@pytest.mark.parametrize("page_size", [1, 2])
async def test_list_versions_pages_newest_first(
    registry: RunningRegistry, llama_dir: Path, page_size: int
) -> None:
    client = registry.client
    name = f"paged-{page_size}"
    for _ in range(3):
        await upload_directory(
            client, pb.VersionMetadata(model_name=name, create_model=True, format=FP32), llama_dir
        )
    seen, token = [], ""
    while True:
        page = await client.unary(
            client.stub.ListVersions,
            pb.ListVersionsRequest(model_name=name, page_size=page_size, page_token=token),
        )
        seen += [v.version for v in page.versions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [3, 2, 1]
