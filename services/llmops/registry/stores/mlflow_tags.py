"""How registry metadata is written into MLflow tags, and read back.

MLflow is the source of truth, and the MLflow UI shows what the registry API holds:

- registered model: description; the caller's tags under their own keys; ``llmops.created_by``.
- model version: description; the caller's tags under their own keys; everything else under
  ``llmops.*`` keys, one value per tag, so the UI lists format, sizes, lineage and the manifest:
  ``llmops.format``, ``llmops.status``, ``llmops.manifest`` (JSON ``[[path, size, sha256], ...]``),
  ``llmops.manifest_sha256``, ``llmops.size_bytes``, ``llmops.parameter_count``,
  ``llmops.base_model``, ``llmops.adapter_base`` and ``llmops.parent`` (``name:version``),
  ``llmops.dataset.path|revision|repo``, ``llmops.dataset_commit``, ``llmops.mlflow_run_id``,
  ``llmops.job_id``, ``llmops.job_kind``, ``llmops.metrics`` (JSON), ``llmops.created_by``,
  ``llmops.request_sha256``, ``llmops.failure_reason``.

Callers may not use the ``llmops.`` and ``mlflow.`` key prefixes for their own tags. A version
registered in MLflow by other means has no ``llmops.format`` and reads with ``format=None`` and an
empty manifest (it cannot be downloaded through the registry, which could not verify it).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from llmops.common.artifacts import manifest as manifest_codec
from llmops.registry.domain import (
    RESERVED_TAG_PREFIXES,
    DatasetRef,
    JobKind,
    Lineage,
    Model,
    ModelFormat,
    ModelRef,
    ModelVersion,
    NewVersion,
    VersionStatus,
)

CREATED_BY = "llmops.created_by"
REQUEST_SHA256 = "llmops.request_sha256"
_MLFLOW_STATUS = {
    "PENDING_REGISTRATION": VersionStatus.PENDING,
    "READY": VersionStatus.READY,
    "FAILED_REGISTRATION": VersionStatus.FAILED,
}


def request_sha256(request_id: str) -> str:
    """The tag value that stands for an idempotency key (safe to put in a search filter)."""
    return hashlib.sha256(request_id.encode()).hexdigest()


def _ref(ref: ModelRef | None) -> str:
    return f"{ref.name}:{ref.version}" if ref is not None and ref.version is not None else ""


def _parse_ref(text: str) -> ModelRef | None:
    if not text:
        return None
    name, _, version = text.rpartition(":")
    return ModelRef(name, version=int(version))


def version_tags(new: NewVersion) -> dict[str, str]:
    """Every tag of a new version (the caller's own plus ``llmops.*``), empty values left out."""
    lineage = new.lineage
    dataset = lineage.dataset or DatasetRef("")
    ours = {
        "llmops.format": new.format.value,
        "llmops.status": new.status.value,
        "llmops.manifest": manifest_codec.to_json(new.manifest),
        "llmops.manifest_sha256": new.manifest_sha256,
        "llmops.size_bytes": str(new.size_bytes),
        "llmops.parameter_count": str(new.parameter_count),
        "llmops.base_model": new.base_model,
        "llmops.adapter_base": _ref(new.adapter_base),
        "llmops.parent": _ref(lineage.parent),
        "llmops.dataset.path": dataset.path,
        "llmops.dataset.revision": dataset.revision,
        "llmops.dataset.repo": dataset.repo,
        "llmops.dataset_commit": lineage.dataset_commit,
        "llmops.mlflow_run_id": lineage.mlflow_run_id,
        "llmops.job_id": lineage.job_id,
        "llmops.job_kind": lineage.job_kind.value if lineage.job_kind is not JobKind.NONE else "",
        "llmops.metrics": json.dumps(new.metrics, sort_keys=True) if new.metrics else "",
        CREATED_BY: new.created_by,
        REQUEST_SHA256: request_sha256(new.request_id) if new.request_id else "",
        "llmops.failure_reason": new.failure_reason,
    }
    return {**new.tags, **{k: v for k, v in ours.items() if v}}


def _ms(value: int | None) -> datetime:
    return datetime.fromtimestamp((value or 0) / 1000, UTC)


def user_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if not k.startswith(RESERVED_TAG_PREFIXES)}


def version_from_mlflow(mv: Any, aliases: list[str] | None = None) -> ModelVersion:
    """A :class:`ModelVersion` from an MLflow ``ModelVersion`` entity."""
    tags: dict[str, str] = dict(mv.tags or {})
    fmt_value = tags.get("llmops.format")
    fmt = ModelFormat(fmt_value) if fmt_value in {f.value for f in ModelFormat} else None
    if fmt is None:
        status = _MLFLOW_STATUS.get(str(mv.status), VersionStatus.PENDING)
    else:
        status = VersionStatus(tags.get("llmops.status", "READY"))
    files = manifest_codec.from_json(tags["llmops.manifest"]) if "llmops.manifest" in tags else ()
    dataset_path = tags.get("llmops.dataset.path", "")
    dataset = (
        DatasetRef(dataset_path, tags.get("llmops.dataset.revision", ""), tags.get("llmops.dataset.repo", ""))
        if dataset_path
        else None
    )
    lineage = Lineage(
        parent=_parse_ref(tags.get("llmops.parent", "")),
        dataset=dataset,
        dataset_commit=tags.get("llmops.dataset_commit", ""),
        mlflow_run_id=tags.get("llmops.mlflow_run_id", ""),
        job_id=tags.get("llmops.job_id", ""),
        job_kind=JobKind(tags.get("llmops.job_kind", "NONE")),
    )
    metrics = {k: float(v) for k, v in json.loads(tags.get("llmops.metrics") or "{}").items()}
    return ModelVersion(
        name=mv.name,
        version=int(mv.version),
        format=fmt,
        status=status,
        artifact_uri=str(mv.source or "") if status is VersionStatus.READY else "",
        manifest=files,
        manifest_sha256=tags.get("llmops.manifest_sha256", ""),
        parameter_count=int(tags.get("llmops.parameter_count", "0")),
        base_model=tags.get("llmops.base_model", ""),
        adapter_base=_parse_ref(tags.get("llmops.adapter_base", "")),
        lineage=lineage,
        metrics=metrics,
        tags=user_tags(tags),
        description=mv.description or "",
        created_at=_ms(mv.creation_timestamp),
        created_by=tags.get(CREATED_BY) or (mv.user_id or ""),
        aliases=tuple(sorted(aliases if aliases is not None else (mv.aliases or []))),
        failure_reason=tags.get("llmops.failure_reason", ""),
    )


def model_from_mlflow(
    rm: Any, *, latest_version: int, version_count: int, updated_at: datetime | None = None
) -> Model:
    """A :class:`Model` from an MLflow ``RegisteredModel`` entity and its version summary."""
    tags: dict[str, str] = dict(rm.tags or {})
    last_updated = _ms(rm.last_updated_timestamp)
    return Model(
        name=rm.name,
        description=rm.description or "",
        tags=user_tags(tags),
        created_at=_ms(rm.creation_timestamp),
        updated_at=max(last_updated, updated_at) if updated_at else last_updated,
        created_by=tags.get(CREATED_BY, ""),
        latest_version=latest_version,
        version_count=version_count,
        aliases={str(k): int(v) for k, v in (rm.aliases or {}).items()},
    )
