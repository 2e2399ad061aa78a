"""Calibration data at a revision of the DVC data repository (a Git repository made in the test).

Invariants: a GPTQ job whose calibration reference names a revision calibrates on the file as that
revision holds it (not the workspace's or HEAD's copy), and its registered version and its MLflow
dataset input record the reference and the commit the bytes were read at; the snapshot it read is removed when the job ends;
a bad revision or path is refused at submission (NOT_FOUND, INVALID_ARGUMENT naming the calibration
field) and a server without a data repository answers FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llmops.common.artifacts.sinks import LocalDirectorySink
from llmops.common.datasets import DataRepository
from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound
from llmops.common.jobs import JobState
from llmops.quantization import evaluate
from llmops.quantization.dispatch import ThreadDispatcher
from llmops.quantization.domain import JobSpec
from llmops.quantization.methods import CalibrationSpec, QuantizationSpec, default_quantizers
from llmops.quantization.service import QuantizationService
from llmops.quantization.tracking import run_datasets

pytest.importorskip("dvc.api")

DATA = "data/calibration.jsonl"


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def data_repo(tmp_path: Path) -> tuple[Path, str, str]:
    """A Git repository whose first commit holds enough calibration text and whose HEAD holds a
    file too short for one window; returns (root, first commit, HEAD commit)."""
    root = tmp_path / "data-repo"
    (root / "data").mkdir(parents=True)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "tests@llmops.invalid")
    _git(root, "config", "user.name", "llmops tests")
    texts = evaluate.heldout_texts(max_chars=100_000)[-4:]
    (root / DATA).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "calibration v1")
    first = _git(root, "rev-parse", "HEAD")
    _git(root, "tag", "v1")
    (root / DATA).write_text(json.dumps({"text": "too short"}) + "\n")
    _git(root, "commit", "-q", "-am", "calibration v2")
    return root, first, _git(root, "rev-parse", "HEAD")


def _service(tmp_path: Path, repository: DataRepository | None) -> QuantizationService:
    return QuantizationService(
        default_quantizers(),
        LocalDirectorySink(tmp_path / "registry"),
        ThreadDispatcher(),
        tmp_path / "work",
        repository=repository,
    )


def _gptq(tiny_model_dir: Path, path: str, revision: str = "", repo: str = "") -> JobSpec:
    calibration = CalibrationSpec(
        num_samples=2, seq_len=64, text_path=Path(path), dataset=(path, revision, repo)
    )
    return JobSpec(
        source_dir=tiny_model_dir,
        source_name="tiny",
        source_version=1,
        quantization=QuantizationSpec("gptq", calibration=calibration),
    )


def test_a_job_calibrates_on_the_file_at_the_revision_and_records_its_commit(
    tiny_model_dir: Path, tmp_path: Path, data_repo: tuple[Path, str, str]
) -> None:
    root, first, head = data_repo
    service = _service(tmp_path, DataRepository(root))
    try:
        at_v1 = service.submit(_gptq(tiny_model_dir, DATA, revision="v1"))
        list(service.watch(at_v1.id, timeout=300))
        at_head = service.submit(_gptq(tiny_model_dir, DATA, revision="main"))
        list(service.watch(at_head.id, timeout=300))
    finally:
        service.shutdown()

    done = service.get(at_v1.id)
    assert done.state is JobState.SUCCEEDED, done.error_message
    calibration: Any = done.spec.quantization.calibration
    assert calibration.dataset_commit == first
    record = json.loads((tmp_path / "registry" / "tiny-gptq" / "1" / "version.json").read_text())
    assert record["dataset"] == [DATA, "v1", ""] and record["dataset_commit"] == first
    (tracked,) = run_datasets(done.spec)  # the MLflow run's dataset input
    assert (tracked.source_type, tracked.digest) == ("dvc", first)
    assert json.loads(tracked.source) == {"path": DATA, "revision": "v1", "commit": first, "repo": ""}
    # HEAD's copy has less than one window: the same job at "main" fails on it
    failed = service.get(at_head.id)
    assert failed.state is JobState.FAILED and "fewer than 64 tokens" in failed.error_message
    assert failed.spec.quantization.calibration.dataset_commit == head  # type: ignore[union-attr]
    assert not (tmp_path / "work" / "calibration" / at_v1.id).exists()  # the snapshot is removed


@pytest.mark.parametrize(
    ("path", "revision", "error", "field"),
    [
        (DATA, "nope", NotFound, None),
        ("data/missing.jsonl", "v1", NotFound, None),
        (DATA, "--all", InvalidArgument, "calibration.ref.revision"),
        ("/etc/passwd", "v1", InvalidArgument, "calibration.ref.path"),
    ],
)
def test_bad_references_are_refused_at_submission(
    tiny_model_dir: Path,
    tmp_path: Path,
    data_repo: tuple[Path, str, str],
    path: str,
    revision: str,
    error: type[Exception],
    field: str | None,
) -> None:
    service = _service(tmp_path, DataRepository(data_repo[0]))
    try:
        with pytest.raises(error) as caught:
            service.submit(_gptq(tiny_model_dir, path, revision=revision))
    finally:
        service.shutdown()
    assert getattr(caught.value, "field", None) == field
    assert service.list_jobs() == []


def test_a_server_without_a_data_repository_is_a_failed_precondition(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    service = _service(tmp_path, None)
    try:
        with pytest.raises(FailedPrecondition, match="no data repository"):
            service.submit(_gptq(tiny_model_dir, DATA, revision="v1"))
    finally:
        service.shutdown()
