"""Proto <-> domain conversions of the registry API (the only module besides grpc_app that sees protos)."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from llmops.common.convert import model_ref_from_proto, model_ref_to_proto
from llmops.common.errors import InvalidArgument
from llmops.proto.common.v1 import dataset_pb2, job_pb2, model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from llmops.registry.domain import (
    AliasMove,
    DatasetRef,
    FileChunk,
    JobKind,
    Lineage,
    ManifestFile,
    Model,
    ModelFormat,
    ModelVersion,
    UploadSummary,
    VersionSpec,
    VersionStatus,
)
from llmops.registry.weights import AliasWeights

FORMAT_TO_PROTO = {
    ModelFormat.FP32: model_pb2.MODEL_FORMAT_FP32,
    ModelFormat.BF16: model_pb2.MODEL_FORMAT_BF16,
    ModelFormat.FP16: model_pb2.MODEL_FORMAT_FP16,
    ModelFormat.INT8: model_pb2.MODEL_FORMAT_INT8,
    ModelFormat.INT4: model_pb2.MODEL_FORMAT_INT4,
    ModelFormat.GGUF: model_pb2.MODEL_FORMAT_GGUF,
    ModelFormat.ADAPTER: model_pb2.MODEL_FORMAT_ADAPTER,
}
FORMAT_FROM_PROTO = {v: k for k, v in FORMAT_TO_PROTO.items()}
STATUS_TO_PROTO = {
    VersionStatus.PENDING: pb.VERSION_STATUS_PENDING,
    VersionStatus.READY: pb.VERSION_STATUS_READY,
    VersionStatus.FAILED: pb.VERSION_STATUS_FAILED,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}
JOB_KIND_TO_PROTO = {
    JobKind.NONE: job_pb2.JOB_KIND_UNSPECIFIED,
    JobKind.TRAINING: job_pb2.JOB_KIND_TRAINING,
    JobKind.QUANTIZATION: job_pb2.JOB_KIND_QUANTIZATION,
}
JOB_KIND_FROM_PROTO = {v: k for k, v in JOB_KIND_TO_PROTO.items()}


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def model_to_proto(model: Model) -> pb.Model:
    return pb.Model(
        name=model.name,
        description=model.description,
        tags=model.tags,
        created_at=timestamp(model.created_at),
        updated_at=timestamp(model.updated_at),
        created_by=model.created_by,
        latest_version=model.latest_version,
        version_count=model.version_count,
        aliases=model.aliases,
    )


def manifest_to_proto(files: tuple[ManifestFile, ...]) -> list[pb.ManifestFile]:
    return [pb.ManifestFile(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256) for f in files]


def lineage_to_proto(lineage: Lineage) -> pb.Lineage:
    out = pb.Lineage(
        dataset_commit=lineage.dataset_commit,
        mlflow_run_id=lineage.mlflow_run_id,
        job_id=lineage.job_id,
        job_kind=JOB_KIND_TO_PROTO[lineage.job_kind],
    )
    if lineage.parent is not None:
        out.parent.CopyFrom(model_ref_to_proto(lineage.parent))
    if lineage.dataset is not None:
        out.dataset.CopyFrom(
            dataset_pb2.DatasetRef(
                path=lineage.dataset.path, revision=lineage.dataset.revision, repo=lineage.dataset.repo
            )
        )
    return out


def lineage_from_proto(lineage: pb.Lineage) -> Lineage:
    if lineage.job_kind not in JOB_KIND_FROM_PROTO:
        raise InvalidArgument("unknown job kind", field="metadata.lineage.job_kind")
    dataset = lineage.dataset if lineage.HasField("dataset") else None
    return Lineage(
        parent=model_ref_from_proto(lineage.parent) if lineage.HasField("parent") else None,
        dataset=DatasetRef(dataset.path, dataset.revision, dataset.repo) if dataset is not None else None,
        dataset_commit=lineage.dataset_commit,
        mlflow_run_id=lineage.mlflow_run_id,
        job_id=lineage.job_id,
        job_kind=JOB_KIND_FROM_PROTO[lineage.job_kind],
    )


def version_to_proto(version: ModelVersion) -> pb.ModelVersion:
    out = pb.ModelVersion(
        name=version.name,
        version=version.version,
        format=FORMAT_TO_PROTO[version.format] if version.format else model_pb2.MODEL_FORMAT_UNSPECIFIED,
        status=STATUS_TO_PROTO[version.status],
        artifact_uri=version.artifact_uri,
        manifest=manifest_to_proto(version.manifest),
        manifest_sha256=version.manifest_sha256,
        size_bytes=version.size_bytes,
        parameter_count=version.parameter_count,
        base_model=version.base_model,
        lineage=lineage_to_proto(version.lineage),
        metrics=version.metrics,
        tags=version.tags,
        description=version.description,
        created_at=timestamp(version.created_at),
        created_by=version.created_by,
        aliases=list(version.aliases),
    )
    if version.adapter_base is not None:
        out.adapter_base.CopyFrom(model_ref_to_proto(version.adapter_base))
    return out


def move_to_proto(move: AliasMove) -> pb.AliasHistoryEntry:
    return pb.AliasHistoryEntry(
        model_name=move.model_name,
        alias=move.alias,
        from_version=move.from_version,
        to_version=move.to_version,
        moved_by=move.moved_by,
        moved_at=timestamp(move.moved_at),
        reason=move.reason,
    )


def weights_to_proto(entry: AliasWeights) -> pb.AliasWeights:
    out = pb.AliasWeights(
        model_name=entry.model_name,
        revision=entry.revision,
        weights=entry.weights,
        previous_weights=entry.previous_weights,
        set_by=entry.set_by,
        reason=entry.reason,
    )
    if entry.set_at is not None:
        out.set_at.CopyFrom(timestamp(entry.set_at))
    return out


def spec_from_proto(meta: pb.VersionMetadata) -> VersionSpec:
    if meta.format != model_pb2.MODEL_FORMAT_UNSPECIFIED and meta.format not in FORMAT_FROM_PROTO:
        raise InvalidArgument("unknown format", field="metadata.format")
    return VersionSpec(
        model_name=meta.model_name,
        format=FORMAT_FROM_PROTO.get(meta.format),
        create_model=meta.create_model,
        base_model=meta.base_model,
        adapter_base=model_ref_from_proto(meta.adapter_base) if meta.HasField("adapter_base") else None,
        lineage=lineage_from_proto(meta.lineage),
        parameter_count=meta.parameter_count,
        metrics=dict(meta.metrics),
        tags=dict(meta.tags),
        description=meta.description,
        source_uri=meta.source_uri,
        aliases=tuple(meta.aliases),
        request_id=meta.request_id,
    )


def chunk_from_proto(chunk: pb.FileChunk) -> FileChunk:
    return FileChunk(path=chunk.path, offset=chunk.offset, data=chunk.data, last=chunk.last)


def summary_from_proto(summary: pb.UploadSummary) -> UploadSummary:
    return UploadSummary(tuple(ManifestFile(f.path, f.size_bytes, f.sha256) for f in summary.files))


def statuses_from_proto(values: list[int]) -> frozenset[VersionStatus] | None:
    """The status filter; None (any) when empty. UNSPECIFIED in a filter matches nothing."""
    if not values:
        return None
    known = {int(k): v for k, v in STATUS_FROM_PROTO.items()}
    return frozenset(known[v] for v in values if v in known)
