"""The embedded stack (``llmops up | status | down``) on free local ports.

Invariants: ``up`` starts Redis, the five services and Prometheus, each answering (gRPC health,
PING, Prometheus ready) and Prometheus scraping every service; services reach each other at the
addresses the stack gave them (training and quantization read the registry); a second ``up`` on
the same data folder finds the first running and refuses; ``down`` stops every process it started,
Ray's included, and leaves nothing recorded.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmops.cli import app
from llmops.stack.stack import SERVICES, LocalStack, StackError, StackOptions, alive, read_state
from tests.conftest import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _targets_up(prometheus: str, expected: int, within: float = 30.0) -> int:
    deadline = time.monotonic() + within
    healthy = 0
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{prometheus}/api/v1/targets", timeout=5) as response:
            targets = json.load(response)["data"]["activeTargets"]
        healthy = sum(1 for t in targets if t["health"] == "up")
        if healthy >= expected:
            return healthy
        time.sleep(0.5)
    return healthy


def test_up_status_down(tmp_path: Path) -> None:
    require_tool("redis-server")
    require_tool("prometheus")
    options = StackOptions(
        data_dir=tmp_path / "stack",
        env={"LLMOPS_SERVING_ENGINE": "transformers"},
        mlflow_ui=False,
        grace_seconds=10,
    )
    stack = LocalStack(options)
    state = stack.up()
    try:
        names = [p.name for p in state.parts]
        assert names == ["redis", *SERVICES, "prometheus"]
        runner = CliRunner()
        shown = runner.invoke(app, ["status", "--data-dir", str(options.data_dir)], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        assert shown.output.count("SERVING") == len(SERVICES) and "PONG" in shown.output
        with pytest.raises(StackError, match="already runs"):
            LocalStack(options).up()
        prometheus = state.part("prometheus")
        assert prometheus is not None
        assert _targets_up(prometheus.url, len(SERVICES)) == len(SERVICES)
        # Training found the registry at the address the stack handed it: an unknown base model is
        # NOT_FOUND from the registry, not UNAVAILABLE.
        training = state.part("training")
        assert training is not None
        submitted = runner.invoke(
            app,
            ["train", "submit", "nope:1", "data.jsonl", "--address", training.address, "--max-steps", "1"],
        )
        assert submitted.exit_code == 1 and "NOT_FOUND" in submitted.output and "nope" in submitted.output
    finally:
        stopped = stack.down()
    assert set(stopped) == set(names)
    assert not any(alive(p.pid) for p in state.parts)
    assert read_state(options.data_dir) is None
    gone = CliRunner().invoke(app, ["status", "--data-dir", str(options.data_dir)])
    assert gone.exit_code == 1 and "no stack" in gone.output
