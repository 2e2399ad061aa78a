"""Serving reads weights straight from the artifact store, never through the registry process.

Invariants, against real servers: an MLflow registry whose artifact store is ``s3://`` on moto's S3
server (a real HTTP server on 127.0.0.1; moto stands in for an object store: no real one was tried)
hands out presigned URLs; a serving process loads ``name@alias`` from them, verifies every file
and generates; the registry's DownloadArtifact is called zero times. A second resolver on the same
node cache (another pod, a restart) loads without fetching. A corrupted object is DATA_LOSS and
leaves nothing in the cache. A refused URL (what S3 answers for an expired one) and a store that
never answers are errors, never hangs. With a filesystem artifact store (the embedded stack's) the
files are read from the shared path, mapped through ``weights.shared_mount``. GetArtifactLocations
answers bad references with the right status codes.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

pytest.importorskip("llmops.registry.app", reason="the registry service is not part of this build")
pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")

from prometheus_client import CollectorRegistry

from llmops.common.artifacts.client import upload_directory
from llmops.common.artifacts.direct import Access, DirectFetcher, DirectLocations
from llmops.common.artifacts.domain import ManifestFile
from llmops.common.clients import RegistryClient
from llmops.common.errors import DataLoss, FailedPrecondition, Unavailable
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.registry.grpc_app import RegistryServicer
from llmops.serving.app import default_engine_factory
from llmops.serving.config import ServingConfig
from llmops.serving.domain import (
    EngineKind,
    GenerationRequest,
    LoadRequest,
    ModelRef,
    ModelSelector,
    ModelSource,
    Prompt,
    SamplingParams,
)
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.resolver import RegistryResolver
from llmops.serving.service import ServingService
from tests.integration.registry.conftest import RunningRegistry, start_registry, stop_registry

BUCKET = "llmops-weights"


class CountingFetcher(DirectFetcher):
    """The real fetcher, counting how often it had to read from the store."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fetches = 0

    async def fetch(self, locations: DirectLocations, destination: Path) -> None:
        self.fetches += 1
        await super().fetch(locations, destination)


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (port 0) with credentials in the environment, as a pod gets them."""
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        import boto3  # type: ignore[import-untyped]

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def download_calls() -> Iterator[list[int]]:
    """Counts calls of the registry servicer's DownloadArtifact (patched before the servers start)."""
    calls: list[int] = []
    original = RegistryServicer.DownloadArtifact

    def counted(self: RegistryServicer, request: Any, context: Any) -> Any:
        calls.append(1)
        return original(self, request, context)

    RegistryServicer.DownloadArtifact = counted  # type: ignore[method-assign]
    yield calls
    RegistryServicer.DownloadArtifact = original  # type: ignore[method-assign]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def s3_registry(
    moto_s3: str, download_calls: list[int], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningRegistry]:
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = moto_s3  # MLflow's S3 store and the registry's presigner
    try:
        running = await start_registry(
            tmp_path_factory.mktemp("s3-registry"),
            tmp_path_factory.getbasetemp(),
            mlflow_artifact_root=f"s3://{BUCKET}/mlartifacts",
        )
        try:
            yield running
        finally:
            await stop_registry(running)
    finally:
        os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)


async def register(
    registry: RunningRegistry, folder: Path, name: str, aliases: list[str]
) -> rpb.ModelVersion:
    meta = rpb.VersionMetadata(
        model_name=name, create_model=True, format=model_pb2.MODEL_FORMAT_FP32, aliases=aliases
    )
    return await upload_directory(registry.client, meta, folder)


def resolver_for(
    registry: RunningRegistry, cache: Path, fetcher: DirectFetcher | None = None
) -> RegistryResolver:
    client = RegistryClient.connect(registry.address, timeout=60)
    return RegistryResolver(client, cache, fetcher=fetcher or CountingFetcher(read_timeout=10))


@pytest.mark.slow
async def test_serve_by_alias_from_s3_without_the_registry_streaming(
    s3_registry: RunningRegistry, download_calls: list[int], tiny_model_path: Path, tmp_path: Path
) -> None:
    version = await register(s3_registry, tiny_model_path, "s3-tiny", ["champion"])
    assert version.artifact_uri.startswith(f"s3://{BUCKET}/")
    fetcher = CountingFetcher(read_timeout=10)
    resolver = resolver_for(s3_registry, tmp_path / "node-cache", fetcher)
    service = ServingService(
        default_engine_factory,
        resolver,
        ServingMetrics(CollectorRegistry()),
        EngineShimMetrics(),
        ServingConfig(default_engine=EngineKind.TRANSFORMERS),
    )
    try:
        ref = ModelRef("s3-tiny", alias="champion")
        info = await service.load_model(LoadRequest(ModelSource(model_ref=ref)))
        assert info.model is not None and (info.model.version, info.model.alias) == (
            version.version,
            "champion",
        )
        result = await service.generate(
            GenerationRequest(
                ModelSelector(model_ref=ref),
                Prompt(text="The"),
                SamplingParams(max_tokens=4, ignore_eos=True),
            )
        )
        assert result.model is not None and result.model.version == version.version
        assert result.usage.completion_tokens == 4 and len(result.completions[0].token_ids) == 4
        assert fetcher.fetches == 1
        entry = resolver.cache.entry_path(version.manifest_sha256)
        for f in version.manifest:
            assert (entry / f.path).read_bytes() == (tiny_model_path / f.path).read_bytes()

        # Another pod on the node (or this one restarted): the node cache answers, nothing is fetched.
        second_fetcher = CountingFetcher(read_timeout=10)
        second = resolver_for(s3_registry, tmp_path / "node-cache", second_fetcher)
        try:
            again = await second.resolve(ModelSource(model_ref=ModelRef("s3-tiny", alias="champion")))
        finally:
            await second.close()
        assert again.path == entry and second_fetcher.fetches == 0
    finally:
        await service.close()
    assert download_calls == []  # not one byte through the registry process


@pytest.mark.slow
async def test_corrupted_object_is_rejected(
    s3_registry: RunningRegistry,
    moto_s3: str,
    download_calls: list[int],
    tiny_model_path: Path,
    tmp_path: Path,
) -> None:
    import boto3  # type: ignore[import-untyped]

    version = await register(s3_registry, tiny_model_path, "s3-corrupt", [])
    bucket, _, prefix = version.artifact_uri.removeprefix("s3://").partition("/")
    assert bucket == BUCKET
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    key = f"{prefix}/config.json"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=body.replace(b"{", b"{ ", 1))  # one byte more
    resolver = resolver_for(s3_registry, tmp_path / "node-cache")
    try:
        with pytest.raises(DataLoss, match=r"config\.json"):
            await resolver.resolve(ModelSource(model_ref=ModelRef("s3-corrupt", version=version.version)))
        assert resolver.cache.lookup(version.manifest_sha256, []) is None
        assert not resolver.cache.entry_path(version.manifest_sha256).exists()
    finally:
        await resolver.close()
    assert download_calls == []


@pytest.mark.parametrize(
    ("model", "ttl", "code"),
    [
        (model_pb2.ModelRef(name="no-such-model", version=1), 0, grpc.StatusCode.NOT_FOUND),
        (model_pb2.ModelRef(name="s3-tiny", alias="nobody"), 0, grpc.StatusCode.NOT_FOUND),
        (model_pb2.ModelRef(name="s3-tiny", version=999), 0, grpc.StatusCode.NOT_FOUND),
        (model_pb2.ModelRef(name="Bad Name!"), 0, grpc.StatusCode.INVALID_ARGUMENT),
        (model_pb2.ModelRef(name="s3-tiny"), 604801, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_get_artifact_locations_status_codes(
    s3_registry: RunningRegistry, model: model_pb2.ModelRef, ttl: int, code: grpc.StatusCode
) -> None:
    request = rpb.GetArtifactLocationsRequest(model=model, url_ttl_seconds=ttl)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await s3_registry.client.stub.GetArtifactLocations(request, timeout=30)
    assert caught.value.code() == code


async def test_presigned_locations_have_an_expiry(
    s3_registry: RunningRegistry, tiny_model_path: Path
) -> None:
    version = await register(s3_registry, tiny_model_path, "s3-expiry", [])
    request = rpb.GetArtifactLocationsRequest(
        model=model_pb2.ModelRef(name="s3-expiry", version=version.version), url_ttl_seconds=120
    )
    response = await s3_registry.client.stub.GetArtifactLocations(request, timeout=30)
    assert response.access == rpb.ARTIFACT_ACCESS_PRESIGNED_URL
    assert [loc.file.path for loc in response.files] == [f.path for f in version.manifest]
    assert all("X-Amz-Expires=120" in loc.url and "X-Amz-Signature=" in loc.url for loc in response.files)
    assert response.version.created_at.ToDatetime() < response.expires_at.ToDatetime()


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # what S3 answers for an expired presigned URL
        body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _locations(url: str) -> DirectLocations:
    entry = ManifestFile("model.safetensors", 3, "0" * 64)
    return DirectLocations("m", 1, "1" * 64, Access.PRESIGNED_URL, "", ((entry, url),))


async def test_refused_url_is_failed_precondition(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/bucket/key?X-Amz-Signature=x"
        with pytest.raises(FailedPrecondition, match="HTTP 403"):
            await DirectFetcher(read_timeout=5).fetch(_locations(url), tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert not list(os.scandir(tmp_path))  # no partial file left behind


async def test_silent_store_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection (backlog) and never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        with pytest.raises(Unavailable, match="artifact store"):
            url = f"http://127.0.0.1:{silent.getsockname()[1]}/b/k"
            await DirectFetcher(read_timeout=0.5).fetch(_locations(url), tmp_path)
        with pytest.raises(Unavailable, match="unreachable"):
            await DirectFetcher(read_timeout=0.5).fetch(
                _locations(f"http://127.0.0.1:{closed_port}/b/k"), tmp_path
            )
    finally:
        silent.close()


@pytest.mark.slow
async def test_shared_path_mode_reads_the_mounted_store(
    download_calls: list[int], tiny_model_path: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    registry = await start_registry(tmp_path / "registry", tmp_path_factory.getbasetemp())
    try:
        version = await register(registry, tiny_model_path, "shared-tiny", ["champion"])
        located = await registry.client.stub.GetArtifactLocations(
            rpb.GetArtifactLocationsRequest(model=model_pb2.ModelRef(name="shared-tiny", alias="champion")),
            timeout=30,
        )
        assert located.access == rpb.ARTIFACT_ACCESS_SHARED_PATH
        assert located.shared_root == str(registry.artifact_root)
        # The pod mounts the store elsewhere: a copy of the artifact root stands in for that mount.
        mount = tmp_path / "mnt" / "artifacts"
        shutil.copytree(registry.artifact_root, mount)
        fetcher = CountingFetcher(shared_mount=mount)
        resolver = resolver_for(registry, tmp_path / "node-cache", fetcher)
        try:
            resolved = await resolver.resolve(
                ModelSource(model_ref=ModelRef("shared-tiny", alias="champion"))
            )
            assert resolved.model is not None and resolved.model.version == version.version
            assert (resolved.path / "model.safetensors").read_bytes() == (
                tiny_model_path / "model.safetensors"
            ).read_bytes()
            assert fetcher.fetches == 1
        finally:
            await resolver.close()
        # A pod without the volume mounted gets a clear FAILED_PRECONDITION, not a registry stream.
        unmounted = resolver_for(
            registry, tmp_path / "other-node", DirectFetcher(shared_mount=tmp_path / "nothing")
        )
        try:
            with pytest.raises(FailedPrecondition, match="mounted"):
                await unmounted.resolve(ModelSource(model_ref=ModelRef("shared-tiny", alias="champion")))
        finally:
            await unmounted.close()
    finally:
        await stop_registry(registry)
    assert download_calls == []
