"""Where a version's files can be read directly, so readers never stream them through the registry.

The registry stores files through MLflow (see :mod:`.stores.mlflow_store`): a version's
``artifact_uri`` is ``<experiment artifact location>/<run id>/artifacts/model``, and each manifest
path is a file (or object key) under it. This module turns that URI into what a reader can use:

- ``file://`` (a filesystem artifact store, the embedded stack's): the absolute path of every file
  and the artifact root they live under, which a reader mounting the same volume maps to its own
  mount point (``serving.weights.shared_mount``);
- ``s3://bucket/prefix`` (MLflow's S3 artifact store; ``mlflow-artifacts:/`` too when the MLflow
  server's ``--artifacts-destination`` is given as ``registry.artifacts_destination``): a presigned
  HTTPS GET URL per file, signed with the registry's own credentials (boto3's usual chain: the
  ``AWS_*`` variables, a profile, the pod's identity) at ``MLFLOW_S3_ENDPOINT_URL`` as MLflow uses
  it, valid for a bounded time.

Anything else (``gs://``, a proxied store without its destination) is FAILED_PRECONDITION: the
caller may still use DownloadArtifact, explicitly. Readers verify every file against the manifest's
sha256, so the registry vouches for the bytes without carrying them.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from llmops.common.artifacts import manifest as manifests
from llmops.common.artifacts.domain import ManifestFile
from llmops.common.domain import ModelRef
from llmops.common.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from llmops.registry.domain import ModelVersion, VersionStatus
from llmops.registry.service import RegistryService
from llmops.registry.stores.base import local_uri_path

#: Longest validity of a presigned URL (SigV4 allows at most seven days).
MAX_URL_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_URL_TTL_SECONDS = 3600


class Access(Enum):
    SHARED_PATH = "shared_path"
    PRESIGNED_URL = "presigned_url"


@dataclass(frozen=True)
class FileLocation:
    """One manifest file and where to read it (``where`` is a path or a URL, by the access kind)."""

    file: ManifestFile
    where: str


@dataclass(frozen=True)
class ArtifactLocations:
    version: ModelVersion
    access: Access
    #: SHARED_PATH: the artifact root the paths start with (what a reader maps to its mount).
    shared_root: str
    files: tuple[FileLocation, ...]
    #: PRESIGNED_URL: when the URLs stop working.
    expires_at: datetime | None


@dataclass(frozen=True)
class LocationConfig:
    """How the registry's artifact store is reached.

    Args:
        artifact_root: the registry's MLflow artifact root (``file://...``, ``s3://...``); the
            shared root of filesystem stores. None: a tracking server's default.
        artifacts_destination: the MLflow server's ``--artifacts-destination`` (what
            ``mlflow-artifacts:/`` URIs are relative to); None: such URIs cannot be read directly.
        s3_endpoint_url: the S3-compatible endpoint (MinIO, moto...); None: AWS.
        default_ttl_seconds: validity of presigned URLs when the caller asks for none.
    """

    artifact_root: str | None = None
    artifacts_destination: str | None = None
    s3_endpoint_url: str | None = None
    default_ttl_seconds: int = DEFAULT_URL_TTL_SECONDS


def _s3_client(endpoint_url: str | None) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    return boto3.client(
        "s3", endpoint_url=endpoint_url, config=Config(signature_version="s3v4", retries={"mode": "standard"})
    )


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``) without slashes at the ends."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidArgument(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.strip("/")


class LocationService:
    """Answers GetArtifactLocations for a :class:`RegistryService`.

    Args:
        registry: resolves references (alias, version, latest) to versions.
        config: where the artifact store is.
        s3_client_factory: makes a boto3 S3 client for an endpoint (tests may pass their own).
    """

    def __init__(
        self,
        registry: RegistryService,
        config: LocationConfig,
        s3_client_factory: Callable[[str | None], Any] = _s3_client,
    ) -> None:
        self._registry = registry
        self._config = config
        self._s3_factory = s3_client_factory
        self._s3: Any = None

    async def locations(self, ref: ModelRef, ttl_seconds: int = 0) -> ArtifactLocations:
        """Where each file of the READY version ``ref`` names can be read.

        Raises:
            InvalidArgument: a bad reference or ``ttl_seconds`` outside [0, 7 days].
            NotFound: no such model, alias or version.
            FailedPrecondition: not READY, no manifest, or a store that cannot be read directly.
            DataLoss: the stored manifest does not match its own sha256.
        """
        if not 0 <= ttl_seconds <= MAX_URL_TTL_SECONDS:
            raise InvalidArgument(f"must be in [0, {MAX_URL_TTL_SECONDS}]", field="url_ttl_seconds")
        version = await self._registry.resolve(ref)
        if version.status is not VersionStatus.READY:
            raise FailedPrecondition(f"{version.ref} is {version.status.value}, not READY")
        if version.format is None or not version.manifest:
            raise FailedPrecondition(f"{version.ref} was registered outside llmops and has no manifest")
        if manifests.manifest_sha256(version.manifest) != version.manifest_sha256:
            raise DataLoss(f"{version.ref}: the stored manifest does not match its sha256")
        uri = self._real_uri(version)
        local = local_uri_path(uri)
        if local is not None:
            return self._shared(version, local)
        if urllib.parse.urlparse(uri).scheme == "s3":
            return await self._presigned(version, uri, ttl_seconds or self._config.default_ttl_seconds)
        raise FailedPrecondition(
            f"{version.ref} is stored at {urllib.parse.urlparse(uri).scheme}:, which cannot be read directly "
            "(filesystem and S3 stores can); use DownloadArtifact"
        )

    def _real_uri(self, version: ModelVersion) -> str:
        """The version's URI in the store itself (``mlflow-artifacts:`` resolved to the destination)."""
        uri = version.artifact_uri
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme != "mlflow-artifacts":
            return uri
        destination = self._config.artifacts_destination
        if not destination:
            raise FailedPrecondition(
                f"{version.ref} is stored through the MLflow server's artifact proxy; set "
                "registry.artifacts_destination to the server's --artifacts-destination to read it directly"
            )
        return f"{destination.rstrip('/')}/{parsed.path.lstrip('/')}"

    def _shared(self, version: ModelVersion, folder: Path) -> ArtifactLocations:
        shared_root = ""
        # The registry's own root, else the MLflow server's --artifacts-destination (a proxied store on a
        # volume other pods mount too: the chart's mlflow.artifacts.sharedClaim).
        for uri in (self._config.artifact_root, self._config.artifacts_destination):
            root = local_uri_path(uri or "")
            if root is not None and folder.is_relative_to(root):
                shared_root = str(root)
                break
        files = tuple(FileLocation(f, str(manifests.local_path(folder, f.path))) for f in version.manifest)
        return ArtifactLocations(version, Access.SHARED_PATH, shared_root, files, None)

    async def _presigned(self, version: ModelVersion, uri: str, ttl: int) -> ArtifactLocations:
        bucket, prefix = split_s3_uri(uri)
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl)

        def sign() -> tuple[FileLocation, ...]:
            if self._s3 is None:
                self._s3 = self._s3_factory(self._config.s3_endpoint_url)
            out = []
            for f in version.manifest:
                key = f"{prefix}/{f.path}" if prefix else f.path
                url = self._s3.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ttl
                )
                out.append(FileLocation(f, str(url)))
            return tuple(out)

        try:
            files = await asyncio.to_thread(sign)
        except Exception as exc:  # botocore: no credentials, a bad endpoint
            if type(exc).__module__.startswith("botocore"):
                raise Unavailable(f"cannot sign URLs for the artifact store: {type(exc).__name__}") from exc
            raise
        return ArtifactLocations(version, Access.PRESIGNED_URL, "", files, expires_at)
