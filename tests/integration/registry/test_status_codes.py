"""Every registry RPC answers bad input with the status code the proto promises, through a real
server and its interceptors: NOT_FOUND for unknown models, versions and aliases; ALREADY_EXISTS for
duplicates; INVALID_ARGUMENT (with the reason) for malformed requests and for directories that are
not loadable models, for file names and source paths the file system refuses (never INTERNAL);
FAILED_PRECONDITION for moves that lost a compare-and-set or target a FAILED
version; DATA_LOSS for an upload whose summary disagrees with its bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmops.common.artifacts.client import upload_directory, upload_requests
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from tests.integration.registry.conftest import RunningRegistry

FP32 = model_pb2.MODEL_FORMAT_FP32
Code = grpc.StatusCode


def _ref(name: str, **selector: Any) -> model_pb2.ModelRef:
    return model_pb2.ModelRef(name=name, **selector)


def _meta(**fields: Any) -> pb.VersionMetadata:
    base: dict[str, Any] = {"model_name": "known", "format": FP32}
    base.update(fields)
    return pb.VersionMetadata(**base)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(
    registry: RunningRegistry, llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Model "known": version 1 READY (alias champion), version 2 FAILED; model "empty": no versions."""
    client = registry.client
    await upload_directory(client, _meta(create_model=True, aliases=["champion"]), llama_dir)
    requests = [r async for r in upload_requests(_meta(), llama_dir)]
    requests[-1].summary.files[0].sha256 = "0" * 64
    with pytest.raises(Exception, match="does not match"):
        await client.client_stream(client.stub.RegisterVersion, _aiter(requests))
    await client.unary(client.stub.CreateModel, pb.CreateModelRequest(name="empty"))
    root = tmp_path_factory.mktemp("bad-models")
    no_config = Path(shutil.copytree(llama_dir, root / "no-config"))
    (no_config / "config.json").unlink()
    pickle = Path(shutil.copytree(llama_dir, root / "pickle"))
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    reshaped = Path(shutil.copytree(llama_dir, root / "reshaped"))
    config = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    return {"good": llama_dir, "no_config": no_config, "pickle": pickle, "reshaped": reshaped}


async def _aiter(items: list[Any]) -> Any:
    for item in items:
        yield item


def _chunk(path: str, offset: int = 0, data: bytes = b"x", last: bool = True) -> pb.RegisterVersionRequest:
    return pb.RegisterVersionRequest(chunk=pb.FileChunk(path=path, offset=offset, data=data, last=last))


def _with_meta(meta: pb.VersionMetadata, *rest: pb.RegisterVersionRequest) -> list[pb.RegisterVersionRequest]:
    return [pb.RegisterVersionRequest(metadata=meta), *rest]


UNARY_CASES: list[tuple[str, str, Any, Code]] = [
    ("create bad name", "CreateModel", pb.CreateModelRequest(name="Bad/Name"), Code.INVALID_ARGUMENT),
    ("create duplicate", "CreateModel", pb.CreateModelRequest(name="known"), Code.ALREADY_EXISTS),
    (
        "create long text",
        "CreateModel",
        pb.CreateModelRequest(name="x1", description="d" * 5000),
        Code.INVALID_ARGUMENT,
    ),
    (
        "create reserved tag",
        "CreateModel",
        pb.CreateModelRequest(name="x2", tags={"mlflow.x": "1"}),
        Code.INVALID_ARGUMENT,
    ),
    ("get unknown model", "GetModel", pb.GetModelRequest(name="nope"), Code.NOT_FOUND),
    ("get empty name", "GetModel", pb.GetModelRequest(name=""), Code.INVALID_ARGUMENT),
    ("list bad size", "ListModels", pb.ListModelsRequest(page_size=-1), Code.INVALID_ARGUMENT),
    ("list bad token", "ListModels", pb.ListModelsRequest(page_token="%%%"), Code.INVALID_ARGUMENT),
    ("version unknown model", "GetVersion", pb.GetVersionRequest(model=_ref("nope")), Code.NOT_FOUND),
    (
        "version unknown number",
        "GetVersion",
        pb.GetVersionRequest(model=_ref("known", version=99)),
        Code.NOT_FOUND,
    ),
    (
        "version zero",
        "GetVersion",
        pb.GetVersionRequest(model=_ref("known", version=0)),
        Code.INVALID_ARGUMENT,
    ),
    (
        "version unknown alias",
        "GetVersion",
        pb.GetVersionRequest(model=_ref("known", alias="gone")),
        Code.NOT_FOUND,
    ),
    (
        "version bad alias",
        "GetVersion",
        pb.GetVersionRequest(model=_ref("known", alias="Bad!")),
        Code.INVALID_ARGUMENT,
    ),
    ("latest of empty model", "GetVersion", pb.GetVersionRequest(model=_ref("empty")), Code.NOT_FOUND),
    ("list versions unknown", "ListVersions", pb.ListVersionsRequest(model_name="nope"), Code.NOT_FOUND),
    (
        "list versions bad size",
        "ListVersions",
        pb.ListVersionsRequest(model_name="known", page_size=5000),
        Code.INVALID_ARGUMENT,
    ),
    (
        "alias unknown model",
        "SetAlias",
        pb.SetAliasRequest(model_name="nope", alias="a", version=1),
        Code.NOT_FOUND,
    ),
    (
        "alias unknown version",
        "SetAlias",
        pb.SetAliasRequest(model_name="known", alias="a", version=99),
        Code.NOT_FOUND,
    ),
    (
        "alias failed version",
        "SetAlias",
        pb.SetAliasRequest(model_name="known", alias="a", version=2),
        Code.FAILED_PRECONDITION,
    ),
    (
        "alias lost cas",
        "SetAlias",
        pb.SetAliasRequest(model_name="known", alias="champion", version=1, expected_current_version=0),
        Code.FAILED_PRECONDITION,
    ),
    (
        "alias reserved",
        "SetAlias",
        pb.SetAliasRequest(model_name="known", alias="latest", version=1),
        Code.INVALID_ARGUMENT,
    ),
    (
        "alias version-like",
        "SetAlias",
        pb.SetAliasRequest(model_name="known", alias="v1", version=1),
        Code.INVALID_ARGUMENT,
    ),
    (
        "alias version zero",
        "SetAlias",
        pb.SetAliasRequest(model_name="known", alias="a", version=0),
        Code.INVALID_ARGUMENT,
    ),
    (
        "delete unknown alias",
        "DeleteAlias",
        pb.DeleteAliasRequest(model_name="known", alias="gone"),
        Code.NOT_FOUND,
    ),
    (
        "delete lost cas",
        "DeleteAlias",
        pb.DeleteAliasRequest(model_name="known", alias="champion", expected_current_version=7),
        Code.FAILED_PRECONDITION,
    ),
    (
        "resolve unknown alias",
        "ResolveAlias",
        pb.ResolveAliasRequest(model_name="known", alias="gone"),
        Code.NOT_FOUND,
    ),
    (
        "resolve unknown model",
        "ResolveAlias",
        pb.ResolveAliasRequest(model_name="nope", alias="champion"),
        Code.NOT_FOUND,
    ),
    (
        "history unknown model",
        "ListAliasHistory",
        pb.ListAliasHistoryRequest(model_name="nope"),
        Code.NOT_FOUND,
    ),
    (
        "history bad token",
        "ListAliasHistory",
        pb.ListAliasHistoryRequest(model_name="known", page_token="x"),
        Code.INVALID_ARGUMENT,
    ),
    ("lineage unknown", "GetLineage", pb.GetLineageRequest(model=_ref("nope")), Code.NOT_FOUND),
    (
        "lineage negative depth",
        "GetLineage",
        pb.GetLineageRequest(model=_ref("known"), max_depth=-1),
        Code.INVALID_ARGUMENT,
    ),
]

DOWNLOAD_CASES: list[tuple[str, pb.DownloadArtifactRequest, Code]] = [
    ("unknown model", pb.DownloadArtifactRequest(model=_ref("nope")), Code.NOT_FOUND),
    ("failed version", pb.DownloadArtifactRequest(model=_ref("known", version=2)), Code.FAILED_PRECONDITION),
    (
        "unknown path",
        pb.DownloadArtifactRequest(model=_ref("known", version=1), paths=["x.bin"]),
        Code.NOT_FOUND,
    ),
    (
        "chunk too big",
        pb.DownloadArtifactRequest(model=_ref("known"), chunk_size_bytes=4 << 20),
        Code.INVALID_ARGUMENT,
    ),
    (
        "offset without path",
        pb.DownloadArtifactRequest(model=_ref("known"), resume_offset=5),
        Code.INVALID_ARGUMENT,
    ),
]

RegisterCase = Callable[[dict[str, Path]], Any]
REGISTER_CASES: list[tuple[str, RegisterCase, Code, str]] = [
    ("empty stream", lambda w: _aiter([]), Code.INVALID_ARGUMENT, "metadata"),
    ("chunk first", lambda w: _aiter([_chunk("a")]), Code.INVALID_ARGUMENT, "metadata"),
    (
        "metadata twice",
        lambda w: _aiter(_with_meta(_meta(), pb.RegisterVersionRequest(metadata=_meta()))),
        Code.INVALID_ARGUMENT,
        "exactly once",
    ),
    ("no format", lambda w: upload_requests(_meta(format=0), w["good"]), Code.INVALID_ARGUMENT, "format"),
    ("unknown model", lambda w: upload_requests(_meta(model_name="nope"), w["good"]), Code.NOT_FOUND, "nope"),
    (
        "adapter without base",
        lambda w: upload_requests(_meta(format=model_pb2.MODEL_FORMAT_ADAPTER), w["good"]),
        Code.INVALID_ARGUMENT,
        "adapter_base",
    ),
    ("path traversal", lambda w: _aiter(_with_meta(_meta(), _chunk("../x"))), Code.INVALID_ARGUMENT, ".."),
    (
        "offset gap",
        lambda w: _aiter(_with_meta(_meta(), _chunk("a", last=False), _chunk("a", offset=9))),
        Code.INVALID_ARGUMENT,
        "offset",
    ),
    (
        "missing config",
        lambda w: upload_requests(_meta(), w["no_config"]),
        Code.INVALID_ARGUMENT,
        "config.json is missing",
    ),
    ("pickle weights", lambda w: upload_requests(_meta(), w["pickle"]), Code.INVALID_ARGUMENT, "pickle"),
    (
        "shapes differ",
        lambda w: upload_requests(_meta(), w["reshaped"]),
        Code.INVALID_ARGUMENT,
        "do not match",
    ),
    (
        "source and chunks",
        lambda w: _aiter(_with_meta(_meta(source_uri=w["good"].as_uri()), _chunk("a"))),
        Code.INVALID_ARGUMENT,
        "source_uri",
    ),
    (
        "bad source scheme",
        lambda w: _aiter(_with_meta(_meta(source_uri="ftp://h/x"))),
        Code.INVALID_ARGUMENT,
        "scheme",
    ),
    # a file name within the registry's 512-byte limit but past the file system's 255
    (
        "file name too long",
        lambda w: _aiter(_with_meta(_meta(), _chunk("d/" + "n" * 300))),
        Code.INVALID_ARGUMENT,
        "too long",
    ),
    (
        "source path too long",
        lambda w: _aiter(_with_meta(_meta(source_uri=(w["good"] / ("s" * 300)).as_uri()))),
        Code.INVALID_ARGUMENT,
        "too long",
    ),
    (
        "source through a file",
        lambda w: _aiter(_with_meta(_meta(source_uri=(w["good"] / "config.json" / "x").as_uri()))),
        Code.INVALID_ARGUMENT,
        "not a readable folder",
    ),
]


@pytest.mark.parametrize(("case", "method", "request_", "code"), UNARY_CASES, ids=[c[0] for c in UNARY_CASES])
async def test_unary_rpcs(
    registry: RunningRegistry, world: dict[str, Path], case: str, method: str, request_: Any, code: Code
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(registry.client.stub, method)(request_, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert "Traceback" not in (info.value.details() or "")


@pytest.mark.parametrize(("case", "request_", "code"), DOWNLOAD_CASES, ids=[c[0] for c in DOWNLOAD_CASES])
async def test_download_artifact(
    registry: RunningRegistry, world: dict[str, Path], case: str, request_: Any, code: Code
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in registry.client.stub.DownloadArtifact(request_, timeout=30):
            pass
    assert info.value.code() == code, info.value.details()


@pytest.mark.parametrize(
    ("case", "requests", "code", "reason"), REGISTER_CASES, ids=[c[0] for c in REGISTER_CASES]
)
async def test_register_version(
    registry: RunningRegistry,
    world: dict[str, Path],
    case: str,
    requests: RegisterCase,
    code: Code,
    reason: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.client.stub.RegisterVersion(requests(world), timeout=60)
    assert info.value.code() == code, info.value.details()
    assert reason in (info.value.details() or "")


async def test_summary_mismatch_is_data_loss_and_leaves_a_failed_record(
    registry: RunningRegistry, world: dict[str, Path]
) -> None:
    failed = await registry.client.unary(
        registry.client.stub.GetVersion, pb.GetVersionRequest(model=_ref("known", version=2))
    )
    assert failed.version.status == pb.VERSION_STATUS_FAILED
    assert not failed.version.manifest
    requests = [r async for r in upload_requests(_meta(), world["good"])]
    requests[-1].summary.files.add(path="extra.txt", size_bytes=1, sha256=hashlib.sha256(b"x").hexdigest())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await registry.client.stub.RegisterVersion(_aiter(requests), timeout=60)
    assert info.value.code() == Code.DATA_LOSS
    assert "extra.txt: missing" in (info.value.details() or "")
