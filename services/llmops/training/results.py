"""What a finished training job registers: the result's name, format, lineage and evidence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmops.common.artifacts.sinks import VersionMetadata
from llmops.training.domain import Job


def output_name(job: Job) -> str:
    """The model the result is registered under: the spec's name, else ``<base>-<method>``."""
    return job.spec.output_model_name or f"{job.spec.base_name}-{job.spec.method}"


def version_metadata(job: Job, result: Mapping[str, Any], metrics: Mapping[str, float]) -> VersionMetadata:
    """An adapter names its base; lineage names the base as parent, the data read, the run, the job."""
    spec = job.spec
    assert spec.base_version is not None
    adapter = result["format"] == "adapter"
    return VersionMetadata(
        model_name=output_name(job),
        parent_name=spec.base_name,
        parent_version=spec.base_version,
        description=spec.description
        or f"{spec.base_name}:{spec.base_version} fine-tuned with {spec.method.upper()} on {spec.dataset.path}",
        tags={**spec.tags, "training_method": spec.method},
        metrics=dict(metrics),
        aliases=spec.aliases,
        format=result["format"],
        job_id=job.id,
        job_kind="training",
        adapter_base=(spec.base_name, spec.base_version) if adapter else None,
        dataset=(spec.dataset.path, spec.dataset.revision, spec.dataset.repo),
        dataset_commit=job.dataset_commit,
        mlflow_run_id=job.mlflow_run_id,
        parameter_count=int(result.get("parameter_count", 0)),
    )
