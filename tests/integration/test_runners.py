"""The shared Ray runner's own runtime (what ``llmops serve training`` / ``quantization`` start).

Invariants: with no address and no runtime yet, a runner starts a local one whose workers run at
the service's niceness (not 15 above it, Ray's default); every runner of the process shares it, it outlives the shutdown
of all but the last, and the last one's shutdown stops it and removes its temp folder.

It runs in a child process: the test session's own runtime (``ray_runtime``) may already be up in
this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

_SCRIPT = """
import json, os
import ray
from llmops.common.runners import Resources
from llmops.common.runners import ray_runner

body = "tests.integration.test_runners:report"
training = ray_runner.RayRunner(body=body, default_cpus=0.5, namespace="llmops-training")
quantization = ray_runner.RayRunner(body=body, default_cpus=0.5, namespace="llmops-quantization")
temp = ray_runner._Runtime.own_temp
attempt = quantization.start("qj-1", {"x": 1}, Resources())
outcome = None
while outcome is None:
    _, outcome = attempt.poll(1.0)
training.shutdown()
shared = ray.is_initialized()
quantization.shutdown()
print(json.dumps({"outcome": outcome.kind, "result": outcome.result, "shared": shared,
                  "stopped": not ray.is_initialized(), "temp": temp, "temp_left": os.path.exists(temp)}))
"""


def report(plan: dict[str, Any], emit: Any, stop: threading.Event) -> dict[str, Any]:
    """A job body that says where it ran and at which niceness."""
    return {"plan": plan, "pid": os.getpid(), "nice": os.nice(0)}


def test_an_own_runtime_is_shared_keeps_worker_niceness_and_is_cleaned_up() -> None:
    pytest.importorskip("ray")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["outcome"] == "succeeded", found
    result = found["result"]
    assert result["plan"] == {"x": 1} and result["pid"] != os.getpid()
    assert result["nice"] == os.nice(0)  # this process's niceness: Ray adds nothing (its default: 15)
    assert found["shared"] and found["stopped"]
    assert "llmops-ray-" in Path(found["temp"]).name
    assert not found["temp_left"]
