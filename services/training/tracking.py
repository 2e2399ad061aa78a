"""Experiment tracking of training jobs: one MLflow run per job.

The service (not the worker) logs: it sees every event anyway, it is the only writer of the run
(a SQLite store tolerates one writer best), and a resumed job keeps logging to the same run. The
run holds the resolved plan as parameters, the dataset (path, revision, commit, digest) as an
input, each step's and evaluation's metrics at their step, and the result's files as artifacts.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmops.common.errors import Unavailable
from llmops.training.domain import Job, WorkerPlan

RunStatus = str  # "FINISHED" | "FAILED" | "KILLED"


class Tracker(abc.ABC):
    @abc.abstractmethod
    def start_run(self, job: Job, plan: WorkerPlan, dataset_digest: str) -> str:
        """Create the job's run (parameters, dataset input, tags); returns its id.

        Raises:
            Unavailable: the tracking store cannot be reached.
        """

    @abc.abstractmethod
    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics at ``step`` (training step); may raise on a store error."""

    @abc.abstractmethod
    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str) -> None:
        """Copy a folder's files into the run's artifacts."""

    @abc.abstractmethod
    def end_run(self, run_id: str, status: RunStatus) -> None:
        """Mark the run finished, failed or killed."""


class NullTracker(Tracker):
    """Tracks nothing (unit tests, and servers run with tracking off)."""

    def start_run(self, job: Job, plan: WorkerPlan, dataset_digest: str) -> str:
        return ""

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str) -> None:
        pass

    def end_run(self, run_id: str, status: RunStatus) -> None:
        pass


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


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MlflowTracker(Tracker):
    """Runs in an MLflow tracking store (SQLite file by default, a tracking server on a cluster)."""

    def __init__(self, tracking_uri: str, artifact_root: str | None, default_experiment: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._artifact_root = artifact_root
        self._default_experiment = default_experiment
        self._experiments: dict[str, str] = {}

    def _experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        found = self._client.get_experiment_by_name(name)
        if found is None:
            location = f"{self._artifact_root.rstrip('/')}/{name}" if self._artifact_root else None
            try:
                experiment_id = self._client.create_experiment(name, artifact_location=location)
            except Exception:  # another process created it first
                again = self._client.get_experiment_by_name(name)
                if again is None:
                    raise
                experiment_id = again.experiment_id
        else:
            experiment_id = found.experiment_id
        self._experiments[name] = experiment_id
        return experiment_id

    def start_run(self, job: Job, plan: WorkerPlan, dataset_digest: str) -> str:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag

        spec = job.spec
        try:
            experiment = self._experiment_id(spec.mlflow_experiment or self._default_experiment)
            tags = {
                "mlflow.runName": job.id,
                "llmops.job_id": job.id,
                "llmops.method": spec.method,
                "llmops.base_model": f"{spec.base_name}:{spec.base_version}",
                "llmops.dataset.path": spec.dataset.path,
                "llmops.dataset.revision": spec.dataset.revision,
                "llmops.dataset.commit": job.dataset_commit,
                **{f"user.{k}": v for k, v in spec.tags.items()},
            }
            run = self._client.create_run(experiment, tags=tags, run_name=job.id)
            run_id: str = run.info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(plan).items()]
            self._client.log_batch(run_id, params=params, tags=[RunTag("llmops.created_by", job.created_by)])
            source = json.dumps(
                {
                    "path": spec.dataset.path,
                    "revision": spec.dataset.revision,
                    "commit": job.dataset_commit,
                    "repo": spec.dataset.repo,
                },
                sort_keys=True,
            )
            dataset = Dataset(
                name=Path(spec.dataset.path).name,
                digest=dataset_digest[:36],
                source_type="dvc",
                source=source,
                schema=json.dumps({"format": plan.data_format}),
            )
            self._client.log_inputs(
                run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
            )
        except Exception as error:
            raise Unavailable(
                f"MLflow tracking store unreachable: {str(error).splitlines()[0][:200]}"
            ) from None
        return run_id

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if values:
            self._client.log_batch(run_id, metrics=values)

    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str) -> None:
        self._client.log_artifacts(run_id, str(directory), artifact_path)

    def end_run(self, run_id: str, status: RunStatus) -> None:
        self._client.set_terminated(run_id, status)


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
