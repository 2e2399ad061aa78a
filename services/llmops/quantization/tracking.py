"""Experiment tracking of quantization jobs: one MLflow run per job.

The run is created when the job starts and named after the job. It holds the method's settings and
what was measured as parameters (``method``, ``bits``, ``group_size``, ``gguf_type``, ``device``,
``eval.num_samples``...), the source as a tag (``llmops.source`` = ``name:version``), the data the
job read (held-out evaluation text, calibration data) as dataset inputs, the measurements (sizes,
ratio, perplexities, tokens/s before and after) as metrics, and the result folder as artifacts
under ``model``. Logging, closing and run creation are shared with training
(:mod:`llmops.common.tracking`).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import sys
import sysconfig
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
from llmops.quantization.domain import Job, JobSpec

__all__ = ["MlflowTracker", "NullTracker", "RunStatus", "Tracker", "dataset_record", "run_params"]

#: The files of a folder that held-out evaluation text is read from.
_TEXT_SUFFIXES = {".py", ".txt", ".md"}


class Tracker(RunTracker):
    @abc.abstractmethod
    def start_run(self, job: Job) -> str:
        """Create the job's run (parameters, tags, dataset inputs); returns its id.

        Raises:
            Unavailable: the tracking store cannot be reached.
        """


class NullTracker(NullRunTracker, Tracker):
    """Tracks nothing (unit tests, and servers run with tracking off)."""

    def start_run(self, job: Job) -> str:
        return ""


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    """Scalar settings as parameters; local paths and unset values are left out."""
    params: dict[str, str] = {}
    for key, value in values.items():
        if key == "dataset_commit":  # part of the data's record (its dataset input), not a setting
            continue
        if isinstance(value, dict):
            params.update(_flat(f"{prefix}{key}.", value))
        elif isinstance(value, str | int | float):
            params[f"{prefix}{key}"] = str(value)
    return params


def run_params(spec: JobSpec) -> dict[str, str]:
    """The job's settings as MLflow parameters: the method's (``bits``...) and ``eval.*``."""
    return {
        **_flat("", dataclasses.asdict(spec.quantization)),
        **_flat("eval.", dataclasses.asdict(spec.eval)),
    }


def _path_digest(path: Path) -> str:
    """A digest of a file, or of a folder's text files (names and bytes); of the name if missing."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            digest.update(file_digest(file).encode())
    else:
        digest.update(str(path).encode())
    return digest.hexdigest()


def dataset_record(
    path: Path | None,
    context: str,
    *,
    ref_path: str = "",
    revision: str = "",
    commit: str = "",
    repo: str = "",
) -> DatasetRecord:
    """The dataset input for data a job reads from ``path``: "dvc" when it came from the data
    repository (``ref_path`` in it, at a revision), else "local" with its path; ``path=None`` is
    the built-in held-out text (standard-library files the tiny model was not trained on)."""
    if path is None:
        source = {
            "path": sysconfig.get_paths()["stdlib"],
            "selection": "standard-library files after the tiny model's training corpus",
            "python": sys.version.split()[0],
        }
        digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
        return DatasetRecord("stdlib-heldout", digest, "local", json.dumps(source, sort_keys=True), context)
    dvc = bool(revision or commit or repo)
    source = {"path": ref_path or str(path)}
    if dvc:
        source |= {"revision": revision, "commit": commit, "repo": repo}
    return DatasetRecord(
        name=Path(source["path"]).name or source["path"],
        digest=(commit or _path_digest(path)) if dvc else _path_digest(path),
        source_type="dvc" if dvc else "local",
        source=json.dumps(source, sort_keys=True),
        context=context,
    )


def run_datasets(spec: JobSpec) -> list[DatasetRecord]:
    """The data the job reads: the calibration text of a calibrated method, and the evaluation text
    when perplexity is measured."""
    records: list[DatasetRecord] = []
    calibration = spec.quantization.calibration
    if calibration is not None:
        ref_path, revision, repo = calibration.dataset or ("", "", "")
        records.append(
            dataset_record(
                calibration.text_path,
                "calibration",
                ref_path=ref_path,
                revision=revision,
                commit=calibration.dataset_commit,
                repo=repo,
            )
        )
    if spec.eval.num_samples:
        records.append(dataset_record(spec.eval.text_path, "evaluation"))
    return records


class MlflowTracker(MlflowRunTracker, Tracker):
    """Quantization runs in an MLflow tracking store; the store is first opened by a job's start."""

    def start_run(self, job: Job) -> str:
        spec = job.spec
        source = (
            spec.source_name if spec.source_version is None else f"{spec.source_name}:{spec.source_version}"
        )
        tags = {
            "llmops.job_id": job.id,
            "llmops.method": spec.quantization.method,
            "llmops.source": source,
            **{f"user.{k}": v for k, v in spec.tags.items()},
        }
        return self._create_run(
            self._default_experiment,
            run_name=job.id,
            tags=tags,
            params=run_params(spec),
            datasets=run_datasets(spec),
        )
