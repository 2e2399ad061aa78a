"""Where GetArtifactLocations says a version's files are, per artifact store.

Invariants: a filesystem store yields each file's path and the artifact root to map; ``s3://`` and
``mlflow-artifacts:`` (with the server's destination known) yield one presigned URL per object key
``<prefix>/<manifest path>`` with the asked expiry; a store that cannot be read directly, a version
not READY, or a proxied store without its destination is FAILED_PRECONDITION; a manifest that does
not match its digest is DATA_LOSS.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llmops.common.artifacts.domain import ManifestFile
from llmops.common.artifacts.manifest import manifest_sha256
from llmops.common.domain import ModelRef
from llmops.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from llmops.registry.domain import Lineage, ModelFormat, ModelVersion, VersionStatus
from llmops.registry.locations import Access, LocationConfig, LocationService

MANIFEST = (ManifestFile("config.json", 2, "a" * 64), ManifestFile("sub/model.safetensors", 8, "b" * 64))


def version(uri: str, **changes: Any) -> ModelVersion:
    base = ModelVersion(
        name="m",
        version=3,
        format=ModelFormat.FP32,
        status=VersionStatus.READY,
        artifact_uri=uri,
        manifest=MANIFEST,
        manifest_sha256=manifest_sha256(MANIFEST),
        parameter_count=0,
        base_model="",
        adapter_base=None,
        lineage=Lineage(),
        metrics={},
        tags={},
        description="",
        created_at=datetime.now(UTC),
        created_by="",
    )
    return dataclasses.replace(base, **changes)


class Registry:
    def __init__(self, found: ModelVersion) -> None:
        self.found = found

    async def resolve(self, ref: ModelRef, field: str = "model") -> ModelVersion:
        return self.found


class Signer:
    def __init__(self) -> None:
        self.endpoints: list[str | None] = []
        self.signed: list[tuple[str, str, int]] = []

    def __call__(self, endpoint: str | None) -> Signer:
        self.endpoints.append(endpoint)
        return self

    def generate_presigned_url(self, op: str, Params: dict[str, str], ExpiresIn: int) -> str:
        self.signed.append((Params["Bucket"], Params["Key"], ExpiresIn))
        return f"https://store/{Params['Bucket']}/{Params['Key']}?sig"


def service(found: ModelVersion, signer: Signer | None = None, **config: Any) -> LocationService:
    return LocationService(Registry(found), LocationConfig(**config), signer or Signer())  # type: ignore[arg-type]


async def test_filesystem_store_gives_paths_under_the_root(tmp_path: Path) -> None:
    folder = tmp_path / "mlartifacts" / "1" / "run" / "artifacts" / "model"
    found = await service(
        version(folder.as_uri()), artifact_root=(tmp_path / "mlartifacts").as_uri()
    ).locations(ModelRef("m", alias="champion"))
    assert found.access is Access.SHARED_PATH and found.expires_at is None
    assert found.shared_root == str(tmp_path / "mlartifacts")
    assert [loc.where for loc in found.files] == [
        str(folder / "config.json"),
        str(folder / "sub" / "model.safetensors"),
    ]


async def test_proxied_store_on_a_shared_volume_gives_paths_under_the_destination() -> None:
    """mlflow-artifacts: URIs of a server whose --artifacts-destination is a path (a shared volume)."""
    found = await service(
        version("mlflow-artifacts:/1/run/artifacts/model"),
        artifact_root=None,
        artifacts_destination="/var/lib/mlflow/artifacts",
    ).locations(ModelRef("m", alias="champion"))
    assert found.access is Access.SHARED_PATH
    assert found.shared_root == "/var/lib/mlflow/artifacts"
    assert found.files[0].where == "/var/lib/mlflow/artifacts/1/run/artifacts/model/config.json"


@pytest.mark.parametrize(
    ("uri", "destination", "bucket", "prefix"),
    [
        ("s3://bkt/root/1/run/artifacts/model", None, "bkt", "root/1/run/artifacts/model"),
        (
            "mlflow-artifacts:/1/run/artifacts/model",
            "s3://bkt/mlartifacts",
            "bkt",
            "mlartifacts/1/run/artifacts/model",
        ),
    ],
)
async def test_s3_store_gives_one_presigned_url_per_object(
    uri: str, destination: str | None, bucket: str, prefix: str
) -> None:
    signer = Signer()
    found = await service(
        version(uri), signer, artifacts_destination=destination, s3_endpoint_url="http://minio:9000"
    ).locations(ModelRef("m", version=3), ttl_seconds=600)
    assert found.access is Access.PRESIGNED_URL and found.expires_at is not None
    assert signer.endpoints == ["http://minio:9000"]
    assert signer.signed == [
        (bucket, f"{prefix}/config.json", 600),
        (bucket, f"{prefix}/sub/model.safetensors", 600),
    ]
    assert [loc.file for loc in found.files] == list(MANIFEST)


@pytest.mark.parametrize(
    ("found", "error", "match"),
    [
        (version("gs://bkt/x"), FailedPrecondition, "cannot be read directly"),
        (version("mlflow-artifacts:/1/run/artifacts/model"), FailedPrecondition, "artifacts_destination"),
        (version("s3://bkt/x", status=VersionStatus.FAILED), FailedPrecondition, "not READY"),
        (version("s3://bkt/x", manifest=()), FailedPrecondition, "no manifest"),
        (version("s3://bkt/x", manifest_sha256="c" * 64), DataLoss, "does not match"),
    ],
)
async def test_refusals(found: ModelVersion, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        await service(found).locations(ModelRef("m", version=3))


async def test_ttl_is_bounded() -> None:
    with pytest.raises(InvalidArgument):
        await service(version("s3://bkt/x")).locations(
            ModelRef("m", version=3), ttl_seconds=7 * 24 * 3600 + 1
        )
