"""Fuzzing the registry service (real gRPC server on port 0 over MLflow on SQLite).

Invariant: whatever any registry RPC is sent — fuzzed names, tags, page tokens, model refs, upload
streams whose parts are mutated, dropped, repeated or reordered, undecodable bytes, an oversized
message — the answer is OK or a caller-error status with a message, never INTERNAL/UNKNOWN/
UNAVAILABLE/DATA_LOSS; afterwards the server is SERVING and the seeded version still resolves and
downloads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmops.common.artifacts.client import upload_directory, upload_requests
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from tests.fuzz.suite import FuzzSuite, Target
from tests.integration.registry.conftest import start_registry, stop_registry
from tests.registry_support import write_llama

pytestmark = pytest.mark.fuzz

MODEL = "fuzz"
REF = model_pb2.ModelRef(name=MODEL, version=1)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    running = await start_registry(tmp_path_factory.mktemp("registry-fuzz"), tmp_path_factory.getbasetemp())
    folder = write_llama(tmp_path_factory.mktemp("llama") / "model")
    metadata = pb.VersionMetadata(
        model_name=MODEL, create_model=True, format=model_pb2.MODEL_FORMAT_FP32, aliases=["champion"]
    )
    channel = grpc.aio.insecure_channel(running.address)
    try:
        await upload_directory(running.client, metadata, folder)
        TestRegistryFuzz.seeds = await _seeds(folder)
        stub = running.client.stub

        async def known_good() -> None:
            # Fuzzed SetAlias and DeleteAlias calls may have moved "champion": point it back first.
            await stub.SetAlias(pb.SetAliasRequest(model_name=MODEL, alias="champion", version=1), timeout=30)
            resolve = pb.ResolveAliasRequest(model_name=MODEL, alias="champion")
            assert (await stub.ResolveAlias(resolve, timeout=30)).model.version == 1
            download = pb.DownloadArtifactRequest(model=REF)
            assert [c async for c in stub.DownloadArtifact(download, timeout=30)]

        yield Target(
            channel,
            "llmops.registry.v1.RegistryService",
            known_good,
            running.settings.max_message_bytes,
            running.address,
        )
    finally:
        await channel.close()
        await stop_registry(running)


async def _seeds(folder: Path) -> dict[str, list[object]]:
    upload = pb.VersionMetadata(
        model_name="fuzz-upload", create_model=True, format=model_pb2.MODEL_FORMAT_FP32
    )
    stream = [m async for m in upload_requests(upload, folder, chunk_bytes=16 * 1024)]
    return {
        "CreateModel": [pb.CreateModelRequest(name="fuzz-new", description="d", tags={"k": "v"})],
        "GetModel": [pb.GetModelRequest(name=MODEL)],
        "ListModels": [pb.ListModelsRequest(page_size=2, name_prefix="fu")],
        "RegisterVersion": [stream],
        "GetVersion": [pb.GetVersionRequest(model=REF)],
        "ListVersions": [pb.ListVersionsRequest(model_name=MODEL, page_size=1)],
        "SetAlias": [pb.SetAliasRequest(model_name=MODEL, alias="challenger", version=1, reason="fuzz")],
        "DeleteAlias": [pb.DeleteAliasRequest(model_name=MODEL, alias="challenger")],
        "ResolveAlias": [pb.ResolveAliasRequest(model_name=MODEL, alias="champion")],
        "ListAliasHistory": [pb.ListAliasHistoryRequest(model_name=MODEL, alias="champion", page_size=1)],
        "SetAliasWeights": [
            pb.SetAliasWeightsRequest(model_name=MODEL, weights={"champion": 90}, expected_revision=0)
        ],
        "GetAliasWeights": [pb.GetAliasWeightsRequest(model_name=MODEL)],
        "ListAliasWeightsHistory": [pb.ListAliasWeightsHistoryRequest(model_name=MODEL, page_size=1)],
        "DownloadArtifact": [
            pb.DownloadArtifactRequest(model=REF, paths=["config.json"], chunk_size_bytes=4096)
        ],
        "GetLineage": [pb.GetLineageRequest(model=REF, max_depth=2)],
        "GetArtifactLocations": [pb.GetArtifactLocationsRequest(model=REF, url_ttl_seconds=60)],
    }


class TestRegistryFuzz(FuzzSuite):
    pb_module = pb
    service = "registry"
    timeout = 60.0
    examples = 15
