"""Experiment tracking of training jobs: one MLflow run per job.

The service (not the worker) logs: it sees every event anyway, it is the only writer of the run
(a SQLite store tolerates one writer best), and a resumed job keeps logging to the same run. The
run holds the resolved plan as parameters, the dataset (path, revision, commit, digest) as an
input, each step's and evaluation's metrics at their step, and the result's files as artifacts.
Logging, closing and run creation are shared with quantization (:mod:`llmops.common.tracking`);
this module says what a training run records.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmops.common.tracking import (
    DatasetRecord,
    MlflowRunTracker,
    NullRunTracker,
    RunStatus,
    RunTracker,
    file_digest,
)
from llmops.training.domain import Job, WorkerPlan

__all__ = ["MlflowTracker", "NullTracker", "RunStatus", "Tracker", "file_digest", "flat_params", "metrics_of"]


class Tracker(RunTracker):
    @abc.abstractmethod
    def start_run(self, job: Job, plan: WorkerPlan, dataset_digest: str) -> str:
        """Create the job's run (parameters, dataset input, tags); returns its id.

        Raises:
            Unavailable: the tracking store cannot be reached.
        """


class NullTracker(NullRunTracker, Tracker):
    """Tracks nothing (unit tests, and servers run with tracking off)."""

    def start_run(self, job: Job, plan: WorkerPlan, dataset_digest: str) -> str:
        return ""


def flat_params(plan: WorkerPlan) -> dict[str, str]:
    """The plan as MLflow parameters (``lora.r``...), without local paths."""
    params: dict[str, str] = {}
    for key, value in plan.to_dict().items():
        if key in ("job_id", "base_dir", "dataset_file", "checkpoint_dir", "output_dir", "resume_from"):
            continue
        if isinstance(value, dict):
            params.update({f"{key}.{k}": str(v) for k, v in value.items()})
        else:
            params[key] = str(value)
    return params


class MlflowTracker(MlflowRunTracker, Tracker):
    """Runs in an MLflow tracking store (SQLite file by default, a tracking server on a cluster).

    The store is opened when the tracker is made, so a bad tracking URI stops the server at start.
    """

    def __init__(self, tracking_uri: str, artifact_root: str | None, default_experiment: str) -> None:
        super().__init__(tracking_uri, artifact_root, default_experiment)
        self.connect()

    def start_run(self, job: Job, plan: WorkerPlan, dataset_digest: str) -> str:
        spec = job.spec
        tags = {
            "llmops.job_id": job.id,
            "llmops.method": spec.method,
            "llmops.base_model": f"{spec.base_name}:{spec.base_version}",
            "llmops.dataset.path": spec.dataset.path,
            "llmops.dataset.revision": spec.dataset.revision,
            "llmops.dataset.commit": job.dataset_commit,
            **{f"user.{k}": v for k, v in spec.tags.items()},
            "llmops.created_by": job.created_by,
        }
        source = json.dumps(
            {
                "path": spec.dataset.path,
                "revision": spec.dataset.revision,
                "commit": job.dataset_commit,
                "repo": spec.dataset.repo,
            },
            sort_keys=True,
        )
        dataset = DatasetRecord(
            name=Path(spec.dataset.path).name,
            digest=dataset_digest,
            source_type="dvc",
            source=source,
            context="training",
            schema=json.dumps({"format": plan.data_format}),
        )
        return self._create_run(
            spec.mlflow_experiment or self._default_experiment,
            run_name=job.id,
            tags=tags,
            params=flat_params(plan),
            datasets=[dataset],
        )


def metrics_of(event: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a step or eval event, named as they appear in the run."""
    kind = event.get("kind")
    if kind == "step" and "loss" in event:
        values = {
            "loss": event["loss"],
            "learning_rate": event.get("learning_rate", 0.0),
            "tokens_per_second": event.get("tokens_per_second", 0.0),
            "epoch": event.get("epoch", 0.0),
            **event.get("metrics", {}),
        }
    elif kind == "eval":
        values = {"eval_loss": event.get("loss", 0.0), "eval_perplexity": event.get("perplexity", 0.0)}
        values.update({f"eval_{k}": v for k, v in event.get("metrics", {}).items()})
    else:
        return {}
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and v == v}
