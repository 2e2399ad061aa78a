"""The shared Ray runner's own runtime (what ``llmops serve training`` / ``quantization`` start).

Invariants: with no address and no runtime yet, a runner starts a local one whose workers run at
the service's niceness (not 15 above it, Ray's default); every runner of the process shares it, it outlives the shutdown
of all but the last, and the last one's shutdown stops it and removes its temp folder. A warm runner
runs a CPU job in its spare worker (the body's ``preload`` already run), with the job's CPUs reserved
while it runs and torch's threads set to them, starts the next spare, and gives the CPUs back after.

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


_WARM_SCRIPT = """
import json, time
import ray
from llmops.common.runners import Resources
from llmops.common.runners import ray_runner

runner = ray_runner.RayRunner(body="tests.integration.test_runners:report", default_cpus=1, warm=True)
spare_pid = ray.get(runner._spare.pid.remote(), timeout=240)
attempt = runner.start("wj-1", {"x": 2}, Resources())
outcome = None
while outcome is None:
    _, outcome = attempt.poll(1.0)
next_spare = runner._spare is not None and ray.get(runner._spare.pid.remote(), timeout=240)
deadline = time.monotonic() + 30
while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
    time.sleep(0.1)
freed = ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
runner.shutdown()
print(json.dumps({"outcome": outcome.kind, "result": outcome.result, "spare_pid": spare_pid,
                  "next_spare": next_spare, "total": ray.cluster_resources()["CPU"] if ray.is_initialized() else None,
                  "freed": freed}))
"""


def preload() -> None:
    """What a warm runner's spare runs ahead of a job (the test's stand-in for importing torch)."""
    os.environ["LLMOPS_TEST_PRELOADED"] = str(os.getpid())


def report(plan: dict[str, Any], emit: Any, stop: threading.Event) -> dict[str, Any]:
    """A job body that says where it ran, at which niceness, with which CPUs reserved and threads."""
    found: dict[str, Any] = {"plan": plan, "pid": os.getpid(), "nice": os.nice(0)}
    found["preloaded"] = os.environ.get("LLMOPS_TEST_PRELOADED")
    import ray
    import torch

    found["cpus_free"] = ray.available_resources().get("CPU", 0)
    found["cpus_total"] = ray.cluster_resources().get("CPU", 0)
    found["threads"] = torch.get_num_threads()
    return found


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


def test_a_warm_runner_runs_a_job_in_its_spare_with_the_cpus_reserved() -> None:
    pytest.importorskip("ray")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", _WARM_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["outcome"] == "succeeded", found
    result = found["result"]
    assert result["plan"] == {"x": 2}
    assert result["pid"] == found["spare_pid"] and result["preloaded"] == str(found["spare_pid"])
    assert result["cpus_free"] == result["cpus_total"] - 1  # the job's one CPU is reserved
    assert result["threads"] == 1  # torch's threads: the job's CPUs
    assert found["next_spare"] and found["next_spare"] != found["spare_pid"]  # a new spare is warming
    assert found["freed"]  # the job's CPUs are back once it ended
