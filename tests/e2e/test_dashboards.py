"""The Grafana dashboards and recording rules, proven against a real Prometheus.

On the demo's stack (every service scraped every second by Prometheus from Debian, the chart's
rules loaded), a short headless Locust run with the mixed scenario (unary and streamed generation,
cache hits, the control plane) and then: every PromQL expression of every dashboard panel, every
dashboard variable and every recording rule returns data over the stack's lifetime, except the
panels that read only kube-state-metrics, the router's retries and a version's error ratio, which
only failing replicas make, and the serving-pool panels (the demo runs no pools): all named here, so
the lists cannot grow unnoticed. The load goes
through the router in front of the two serving replicas, and one request for a model no replica
serves is held until its deadline (the held-request, hold-time and error panels); the
check itself reports a selector that matches nothing as empty; Prometheus loaded every recording
rule and evaluates them without errors; the plot script draws the run's report from that
Prometheus.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from llmops.proto.common.v1 import generation_pb2 as generation_pb
from llmops.proto.serving.v1 import serving_service_pb2 as serving_pb
from llmops.proto.serving.v1 import serving_service_pb2_grpc as serving_grpc
from llmops.stack import dashboards
from llmops.stack.dashboards import Query, evaluate, instant, queries
from tests.conftest import require_tool
from tests.e2e.conftest import REPO, DemoRun

#: The session's demo fixture (two runs of the loop, vLLM starts) runs inside whichever test comes
#: first; on a busy 2-core machine it takes well over pytest's default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(2400)]
#: Panels that need a Kubernetes cluster: replicas come from kube-state-metrics.
CLUSTER_ONLY = {"serving.json panel 'Serving replicas' A", "serving.json panel 'Serving replicas' B"}
#: Panels that show data only after a fault: a retry needs a replica that fails before its first
#: answer (tests/integration/router/test_faults.py counts them on real replicas); a version's error
#: ratio needs failed generations (tests/integration/router/test_rollouts.py rolls back on them).
FAULT_ONLY = {
    "router.json panel 'Errors and retries' B",
    "router.json panel 'Rollout $model: traffic share and error ratio by version' B",
}
#: Panels of serving pools, which the demo's stack does not run (its replicas load by RPC):
#: tests/integration/test_fleet_pools.py reads these series from real pool replicas' /metrics.
POOL_ONLY = {
    "serving.json panel 'Pool reload phases' A",
    "serving.json panel 'Pool versions and reloads' A",
    "serving.json panel 'Pool versions and reloads' B",
    "serving.json panel 'Pool versions and reloads' C",
}


def _locust(demo_run: DemoRun, prefix: Path) -> subprocess.CompletedProcess[str]:
    state = demo_run.result.state
    address = {part.name: part.address for part in state.parts}
    command = [
        sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"),
        "--headless", "-u", "4", "-r", "4", "-t", "20s", "--only-summary",
        "--scenario", "mixed", "--max-tokens", "8",
        # through the router, so its panels and the replicas' both see the load
        "--serving", address.get("router", address["serving"]), "--registry", address["registry"], "--training", address["training"],
        "--csv", str(prefix), "--html", f"{prefix}.html",
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_every_panel_and_recording_rule_shows_data_after_a_load(demo_run: DemoRun, tmp_path: Path) -> None:
    require_tool("prometheus")
    state = demo_run.result.state
    prometheus = state.part("prometheus")
    assert prometheus is not None
    run = _locust(demo_run, tmp_path / "run")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert int(rows["Aggregated"]["Request Count"]) > 0 and rows["Aggregated"]["Failure Count"] == "0"
    _held_until_deadline(address_of(demo_run, "router"))
    time.sleep(3)  # a scrape and a rule evaluation after the last request

    lifetime = time.time() - state.started_at + 30
    outcomes = evaluate(prometheus.url, queries(), {"namespace": "local"}, seconds=lifetime)
    shown = "\n".join(f"{o.status:8} {o.series:3} {o.query.where}: {o.error or o.promql}" for o in outcomes)
    missing = {o.query.where for o in outcomes if o.status in ("empty", "error")}
    assert missing == FAULT_ONLY | POOL_ONLY, shown
    assert {o.query.where for o in outcomes if o.status == "cluster"} == CLUSTER_ONLY, shown
    wheres = {o.query.where for o in outcomes}
    assert len(wheres) == len(outcomes) > 60  # every dashboard's panels and every rule, each once

    (probe,) = evaluate(
        prometheus.url, [Query("probe", 'llmops_serving_requests_total{model="no-such-model"}')], {}
    )
    assert probe.status == "empty"  # a panel without data is caught

    recorded = {q.where.removeprefix("rules.yaml ") for q in queries() if q.where.startswith("rules.yaml ")}
    loaded = _loaded_rules(prometheus.url)
    assert set(loaded) == recorded
    assert all(health == "ok" for health in loaded.values()), loaded
    assert instant(prometheus.url, 'llmops:cache_hit_ratio:rate5m{namespace="local"} > 0')  # hits happened

    report = tmp_path / "report"
    plots = subprocess.run(
        [sys.executable, "-m", "loadtests.plots", "--prometheus", prometheus.url, "--out", str(report),
         "--run", str(tmp_path / "run"), "--locust-html", f"{tmp_path / 'run'}.html"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert plots.returncode == 0, plots.stdout + plots.stderr
    assert len(list(report.glob("*.png"))) >= 4
    assert "<img" in (report / "index.html").read_text()


def address_of(demo_run: DemoRun, name: str) -> str:
    (part,) = [p for p in demo_run.result.state.parts if p.name == name]
    return part.address


def _held_until_deadline(router: str) -> None:
    """A request for a model no replica serves waits in the router until its deadline."""
    request = serving_pb.GenerateRequest(
        model=serving_pb.ModelSelector(served_name="no-replica-serves-this"),
        prompt=generation_pb.Prompt(text="hello"),
    )
    with grpc.insecure_channel(router) as channel:
        stub = serving_grpc.ServingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Generate(request, timeout=3.0)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "became ready before the deadline" in (raised.value.details() or "")  # the router's answer


def _loaded_rules(prometheus: str) -> dict[str, str]:
    """Recording rules Prometheus evaluates, with their health."""
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules?type=record", timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}


def test_the_rules_file_the_stack_loads_is_the_charts() -> None:
    assert dashboards.RULES.is_file() and dashboards.DASHBOARDS.is_dir()
    assert dashboards.RULES.resolve() == (REPO / "infra" / "prometheus" / "rules.yaml").resolve()
