"""Artifacts through a real server: what goes up comes down byte for byte, or not at all.

Invariants: an uploaded folder downloads identical, with progress reported up to the total; MLflow
holds what the API registered (registered model, version tags, alias, files in the run's artifact
folder), so the MLflow UI shows it; a byte flipped on disk ends the download with DATA_LOSS and the
client never writes the corrupt file; an upload cut off half way (the client cancels the stream)
leaves no model, no version, no MLflow run and no file in staging or the artifact store.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from pathlib import Path

import grpc
import pytest

from llmops.common.artifacts.client import download_to_directory, upload_directory, upload_requests
from llmops.common.errors import DataLoss
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from llmops.registry.stores.base import local_uri_path
from tests.integration.registry.conftest import RunningRegistry
from tests.registry_support import write_llama

FP32 = model_pb2.MODEL_FORMAT_FP32


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _tree_size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _scrape(port: int | None) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as page:
        return str(page.read().decode())


def _mlflow(registry: RunningRegistry):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    uri = registry.settings.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def bigger_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ~2.6 MB of weights: several chunks at 256 KiB.
    return write_llama(tmp_path_factory.mktemp("bigger") / "model", vocab=2048, hidden=128, intermediate=256)


async def test_round_trip_with_progress_and_mlflow_sees_it(
    registry: RunningRegistry, bigger_model: Path, tmp_path: Path
) -> None:
    client = registry.client
    uploads: list[tuple[int, int]] = []
    meta = pb.VersionMetadata(
        model_name="roundtrip",
        create_model=True,
        format=FP32,
        aliases=["champion"],
        tags={"team": "nlp"},
        metrics={"eval_loss": 1.5},
        base_model="org/tiny",
    )
    version = await upload_directory(
        client, meta, bigger_model, chunk_bytes=256 * 1024, progress=lambda d, t: uploads.append((d, t))
    )
    total = _tree_size(bigger_model)
    assert version.status == pb.VERSION_STATUS_READY and version.size_bytes == total
    assert len(uploads) > 10 and uploads[-1] == (total, total)
    assert [d for d, _ in uploads] == sorted(d for d, _ in uploads)

    downloads: list[tuple[int, int]] = []
    ref = model_pb2.ModelRef(name="roundtrip", alias="champion")
    written = await download_to_directory(
        client, ref, tmp_path / "out", chunk_bytes=256 * 1024, progress=lambda d, t: downloads.append((d, t))
    )
    assert {f.path for f in written} == {m.path for m in version.manifest}
    for entry in version.manifest:
        assert (tmp_path / "out" / entry.path).read_bytes() == (bigger_model / entry.path).read_bytes()
    assert downloads[-1] == (total, total) and len(downloads) > 10

    mlflow = _mlflow(registry)
    registered = mlflow.get_registered_model("roundtrip")
    assert registered.aliases == {"champion": version.version}
    mv = mlflow.get_model_version("roundtrip", str(version.version))
    assert mv.tags["llmops.format"] == "fp32" and mv.tags["team"] == "nlp"
    assert mv.tags["llmops.manifest_sha256"] == version.manifest_sha256
    assert mv.run_id and mv.source == version.artifact_uri
    run = mlflow.get_run(mv.run_id)
    assert run.data.metrics == {"eval_loss": 1.5} and run.info.status == "FINISHED"
    stored = local_uri_path(version.artifact_uri)
    assert stored is not None and (stored / "model.safetensors").is_file()

    text = await asyncio.to_thread(_scrape, registry.server.metrics_http_port)
    assert 'llmops_registry_versions_registered_total{format="safetensors"}' in text
    uploaded = next(line for line in text.splitlines() if 'artifact_bytes_total{direction="upload"}' in line)
    assert float(uploaded.split()[-1]) >= total


async def test_corrupt_artifact_ends_with_data_loss(
    registry: RunningRegistry, llama_dir: Path, tmp_path: Path
) -> None:
    client = registry.client
    meta = pb.VersionMetadata(model_name="corrupt", create_model=True, format=FP32)
    version = await upload_directory(client, meta, llama_dir)
    stored = local_uri_path(version.artifact_uri)
    assert stored is not None
    weights = stored / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    ref = model_pb2.ModelRef(name="corrupt", version=version.version)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in client.stub.DownloadArtifact(pb.DownloadArtifactRequest(model=ref), timeout=30):
            pass
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "model.safetensors" in (info.value.details() or "")

    destination = tmp_path / "out"
    with pytest.raises(DataLoss):
        await download_to_directory(client, ref, destination)
    assert not (destination / "model.safetensors").exists()
    assert not any(p.name.endswith(".llmops-part") for p in destination.rglob("*"))
    assert (destination / "config.json").is_file()  # files before the corrupt one were verified


async def test_cut_off_upload_leaves_nothing(registry: RunningRegistry, bigger_model: Path) -> None:
    artifacts_before = _files(registry.artifact_root)
    requests = [
        r
        async for r in upload_requests(
            pb.VersionMetadata(model_name="cutoff", create_model=True, format=FP32),
            bigger_model,
            chunk_bytes=64 * 1024,
        )
    ]
    call = registry.client.stub.RegisterVersion(timeout=60)
    half = len(requests) // 2
    for request in requests[:half]:
        await call.write(request)
    staged = 0
    for _ in range(200):  # wait until the server has written part of the upload to staging
        staged = sum(p.stat().st_size for p in _files(registry.staging_dir))
        if staged > 0:
            break
        await asyncio.sleep(0.05)
    assert staged > 0
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(200):  # the server notices the cancellation and removes its staging folder
        if not _files(registry.staging_dir) and not any(registry.staging_dir.iterdir()):
            break
        await asyncio.sleep(0.05)
    assert not any(registry.staging_dir.iterdir())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.client.stub.GetModel(pb.GetModelRequest(name="cutoff"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert _files(registry.artifact_root) == artifacts_before
    mlflow = _mlflow(registry)
    experiment = mlflow.get_experiment_by_name(registry.settings.registry.experiment_name)
    runs = mlflow.search_runs(
        [experiment.experiment_id], filter_string="tags.`llmops.model` = 'cutoff'", run_view_type=3
    )
    assert runs == []
    assert os.listdir(registry.staging_dir) == []
