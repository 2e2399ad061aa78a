"""Experiment tracking shared by the job services: one MLflow run per job.

A service's tracker creates a job's run when the job starts — what goes into it (parameters, tags,
dataset inputs) is the service's own ``start_run`` — then logs metrics and the result's files to it
and closes it ``FINISHED``, ``FAILED`` or ``KILLED`` before the job's terminal event, so a watcher
that sees the terminal event finds the run closed. This module holds the generic parts: the
logging and closing calls, the experiment lookup (created on first use, with its artifact
location under the configured artifact root), run creation with its dataset inputs, and a tracker
that records nothing.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmops.common.errors import Unavailable

RunStatus = str  # "FINISHED" | "FAILED" | "KILLED"


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
    """A dataset input of a run, as MLflow lists it under the run's datasets."""

    name: str
    #: A content digest (MLflow keeps the first 36 characters).
    digest: str
    #: "dvc" for data read from the data repository at a revision, "local" for a path on the server.
    source_type: str
    #: Where the data came from (JSON: path, and revision/commit/repo for DVC data).
    source: str
    #: What the run used it for: "training", "evaluation" or "calibration".
    context: str
    schema: str | None = None


class RunTracker(abc.ABC):
    """Logging to and closing a job's run; each service's tracker adds its own ``start_run``."""

    @abc.abstractmethod
    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """Metrics at ``step``; may raise on a store error."""

    @abc.abstractmethod
    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str) -> None:
        """Copy a folder's files into the run's artifacts."""

    @abc.abstractmethod
    def end_run(self, run_id: str, status: RunStatus) -> None:
        """Mark the run finished, failed or killed."""


class NullRunTracker(RunTracker):
    """Logs nothing (unit tests, and servers run with tracking off)."""

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str) -> None:
        pass

    def end_run(self, run_id: str, status: RunStatus) -> None:
        pass


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MlflowRunTracker(RunTracker):
    """Runs in an MLflow tracking store (SQLite file by default, a tracking server on a cluster).

    The client is made on first use (``connect`` makes it now): a SQLite store migrates its
    database then, which takes seconds, and a store that cannot be reached fails the job that
    needed it rather than the server.
    """

    def __init__(self, tracking_uri: str, artifact_root: str | None, default_experiment: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self._tracking_uri = tracking_uri
        self._artifact_root = artifact_root
        self._default_experiment = default_experiment
        self._experiments: dict[str, str] = {}
        self._lock = threading.Lock()
        self._client_instance: Any = None

    def connect(self) -> None:
        """Make the client now (and, for a SQLite store, create or migrate its database)."""
        self._client()

    def _client(self) -> Any:
        with self._lock:
            if self._client_instance is None:
                from mlflow import MlflowClient

                self._client_instance = MlflowClient(tracking_uri=self._tracking_uri)
            return self._client_instance

    def _experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        client = self._client()
        found = client.get_experiment_by_name(name)
        if found is None:
            location = f"{self._artifact_root.rstrip('/')}/{name}" if self._artifact_root else None
            try:
                experiment_id: str = client.create_experiment(name, artifact_location=location)
            except Exception:  # another process created it first
                again = client.get_experiment_by_name(name)
                if again is None:
                    raise
                experiment_id = again.experiment_id
        else:
            experiment_id = found.experiment_id
        self._experiments[name] = experiment_id
        return experiment_id

    def _create_run(
        self,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        datasets: Sequence[DatasetRecord] = (),
    ) -> str:
        """A new run in ``experiment`` (created when missing) with its tags, parameters and inputs.

        Raises:
            Unavailable: the tracking store cannot be reached (one line, no traceback).
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param

        try:
            client = self._client()
            run = client.create_run(
                self._experiment_id(experiment), tags={"mlflow.runName": run_name, **tags}, run_name=run_name
            )
            run_id: str = run.info.run_id
            if params:
                client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
            inputs = [
                DatasetInput(
                    Dataset(
                        name=record.name,
                        digest=record.digest[:36],
                        source_type=record.source_type,
                        source=record.source,
                        schema=record.schema,
                    ),
                    tags=[InputTag("mlflow.data.context", record.context)],
                )
                for record in datasets
            ]
            if inputs:
                client.log_inputs(run_id, datasets=inputs)
        except Exception as error:
            first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
            raise Unavailable(f"MLflow tracking store unreachable: {first_line}") from None
        return run_id

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if values:
            self._client().log_batch(run_id, metrics=values)

    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str) -> None:
        self._client().log_artifacts(run_id, str(directory), artifact_path)

    def end_run(self, run_id: str, status: RunStatus) -> None:
        self._client().set_terminated(run_id, status)
