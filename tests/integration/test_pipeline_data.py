"""The data stages as a DVC pipeline: ``dvc repro`` builds the prepared sets and re-runs only what changed.

Invariants: in a fresh Git + DVC repository holding a copy of ``pipelines/``, ``dvc repro`` runs
ingest -> clean -> split -> build and writes sets the training service accepts, with the clean
report as a metrics file; a second ``dvc repro`` runs no stage; changing a split parameter re-runs
split and build only; changing a clean parameter re-runs clean and what follows, never ingest.

The copy's ``ingest.max_functions`` is lowered so the whole test stays well under a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.training.data import validate_rows

pytestmark = pytest.mark.slow

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
STAGES = ("ingest", "clean", "split", "build")
#: Generated files of a local run are not part of the pipeline's source.
GENERATED = shutil.ignore_patterns("__pycache__", "raw", "clean", "split", "prepared", "reports", "dvc.lock")


def _dvc() -> str:
    beside = Path(sys.executable).with_name("dvc")
    found = str(beside) if beside.exists() else shutil.which("dvc")
    if found is None:
        pytest.skip("dvc is not installed (pip install llmops[pipelines])")
    return found


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A Git + DVC repository with ``pipelines/`` copied in; the environment to run ``dvc`` with."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "repo"
    shutil.copytree(PIPELINES, root / "pipelines", ignore=GENERATED)
    env = {
        **os.environ,
        # the stages run `python`: this interpreter, which has datasketch and llmops
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp_path / "home"),
    }
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    subprocess.run([_dvc(), "init", "-q"], cwd=root, env=env, check=True)
    _edit_params(root, lambda params: params["ingest"].update(max_functions=300))
    return root, env


def _edit_params(root: Path, change: Callable[[dict[str, Any]], object]) -> None:
    path = root / "pipelines" / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _repro(root: Path, env: dict[str, str]) -> set[str]:
    """Run ``dvc repro build`` (the data half; the service stages need a stack) in ``pipelines/``;
    the stages it ran."""
    done = subprocess.run(
        [_dvc(), "repro", "build"],
        cwd=root / "pipelines",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ran = set(re.findall(r"Running stage '(\w+)'", done.stdout))
    skipped = set(re.findall(r"Stage '(\w+)' didn't change, skipping", done.stdout))
    assert ran | skipped == set(STAGES), done.stdout
    return ran


def test_repro_builds_the_sets_and_reruns_only_what_changed(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    pipelines = root / "pipelines"
    assert _repro(root, env) == set(STAGES)

    prepared = pipelines / "data" / "prepared"
    assert validate_rows((prepared / "sft.jsonl").read_bytes(), None, "sft")[0] == "prompt_completion"
    assert validate_rows((prepared / "eval.jsonl").read_bytes(), None, "sft")[0] == "prompt_completion"
    assert validate_rows((prepared / "dpo.jsonl").read_bytes(), None, "dpo")[0] == "preference"
    assert (prepared / "calibration.txt").stat().st_size > 0
    report = json.loads((pipelines / "reports" / "clean.json").read_text())
    assert report["preferences"]["input"] == 300
    assert report["instructions"]["kept"] + sum(report["instructions"]["dropped"].values()) == 300 + 32
    lock = yaml.safe_load((pipelines / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    metrics = subprocess.run(
        [_dvc(), "metrics", "show", "--json"],
        cwd=pipelines,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "reports/clean.json" in metrics.stdout

    sft = (prepared / "sft.jsonl").read_bytes()
    assert _repro(root, env) == set()

    _edit_params(root, lambda params: params["split"].update(train=0.7, eval=0.2))
    assert _repro(root, env) == {"split", "build"}
    assert (prepared / "sft.jsonl").read_bytes() != sft

    _edit_params(root, lambda params: params["clean"].update(max_chars=1500))
    assert _repro(root, env) == {"clean", "split", "build"}
    assert _repro(root, env) == set()
