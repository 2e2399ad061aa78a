"""Two runs of the main job (``llmops demo --fast``) for the whole session, its stack left running.

The first run forces a loss (``promote.min_improvement`` no fine-tune of 12 steps reaches: the
champion stays); the second, on the same stack with the shipped ``min_improvement`` of 0, re-runs only
the promote stage (DVC) and serves the champion it leaves. The demo test checks what both runs
produced; the dashboards test puts a load on the same stack and checks every panel. The stack is
stopped when the session ends (or when a run fails).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llmops.stack.demo import DemoOptions, DemoResult, run_demo, run_loop
from llmops.stack.stack import LocalStack, StackOptions
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]


#: Relative eval-perplexity improvement over the champion the first run asks of the candidate: a
#: 90% lower perplexity, which a 12-step fine-tune of the tiny model does not reach.
FORCED_LOSS = 0.9


@dataclasses.dataclass(frozen=True)
class DemoRun:
    kept: DemoResult  # the first run: the candidate lost, the champion stayed
    result: DemoResult  # the second run: the shipped promotion rule
    root: Path  # the data repository (a Git repository holding pipelines/)
    pipeline: Path
    head: str  # its commit


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def _pipeline_copy(root: Path) -> tuple[Path, str]:
    """The repository's tracked pipeline files in a new Git repository; returns (pipelines, HEAD)."""
    for name in _git(REPO, "ls-files", "pipelines").splitlines():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    params_file = root / "pipelines" / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["train"].update(max_steps=12, eval_every_steps=6, checkpoint_every_steps=6, logging_every_steps=2)
    params["evaluate"].update(max_rows=16, sample_prompts=1, max_new_tokens=8)
    params["speed"].update(tokens=24, rounds=3)
    params["speed"]["engine_options"]["vllm"].update(kv_cache_bytes=1 << 28, enforce_eager=True)
    params["promote"]["min_improvement"] = FORCED_LOSS
    # the load gate on the engine that starts in seconds (a second vLLM start costs a minute here)
    params["promote"]["load_gate"].update(engine="transformers", seconds=5)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "tests@llmops.invalid")
    _git(root, "config", "user.name", "llmops tests")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "pipeline")
    return root / "pipelines", _git(root, "rev-parse", "HEAD")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    require_tool("redis-server")
    root = tmp_path_factory.mktemp("demo")
    pipeline, head = _pipeline_copy(root / "repo")
    options = DemoOptions(
        data_dir=root / "data",
        pipeline_dir=pipeline,
        fast=True,
        keep_running=True,
        prometheus=shutil.which("prometheus") is not None,
        scrape_interval="1s",
        mlflow_ui=False,
    )

    def say(line: str) -> None:
        print(f"> {line}", flush=True)

    try:
        kept = run_demo(options, say=say)
        params_file = pipeline / "params.yaml"
        params = yaml.safe_load(params_file.read_text())
        params["promote"]["min_improvement"] = 0.0
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        # the split and the rollouts were shown once (the first run); the second run serves the new
        # champion alone
        result = run_loop(kept.state, dataclasses.replace(options, split_requests=0, rollouts=False), say=say)
        yield DemoRun(kept, result, root / "repo", pipeline, head)
    finally:
        LocalStack(StackOptions(data_dir=options.data_dir)).down()
