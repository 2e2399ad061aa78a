"""Headless Locust runs of ``loadtests/locustfile.py`` against a real serving gRPC server.

Serving runs in this process on 127.0.0.1 port 0 with the transformers engine and the tiny model,
loaded as registry version ``tiny:1`` (alias ``champion``) so its response cache (a real
redis-server) answers repeated deterministic prompts; a stub registry and training server (canned
answers, real gRPC) stand in for the control plane. Locust runs as a subprocess, as a user runs it.

Invariant: a short mixed run reports every entry a user would look for — unary and streamed
Generate, cache hits, TTFT and ITL measured from the stream, each control-plane call — with
non-zero counts and no failures, and exits 0; an impossible threshold makes the run exit 3 naming
the threshold; a dead address or a missing model ends the run at once with exit code 2 and a
message naming the problem.
"""

from __future__ import annotations

import asyncio
import csv
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmops.common.process import create_subprocess_exec
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.proto.registry.v1 import registry_service_pb2_grpc as rgrpc
from llmops.proto.training.v1 import training_service_pb2 as tpb
from llmops.proto.training.v1 import training_service_pb2_grpc as tgrpc
from llmops.serving.domain import (
    EngineKind,
    LoadRequest,
    ModelRef,
    ModelSource,
    ResolvedModel,
    ResolvedSource,
)
from llmops.serving.resolver import ModelResolver
from tests.redis_fixture import redis_server

__all__ = ["redis_server"]

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
MODEL = "tiny"


class ChampionResolver(ModelResolver):
    """Any reference is the tiny model's folder as registry version ``tiny:1`` (alias champion)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        return ResolvedSource(path=self.path, model=ResolvedModel(MODEL, 1, "champion"))

    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        return ResolvedModel(MODEL, 1, "champion")


class StubRegistry(rgrpc.RegistryServiceServicer):
    async def ListModels(self, request: Any, context: Any) -> rpb.ListModelsResponse:
        return rpb.ListModelsResponse(
            models=[rpb.Model(name=MODEL, latest_version=1, aliases={"champion": 1})]
        )

    async def ResolveAlias(self, request: Any, context: Any) -> rpb.ResolveAliasResponse:
        resolved = model_pb2.ResolvedModel(name=request.model_name, version=1, alias=request.alias)
        return rpb.ResolveAliasResponse(model=resolved)


class StubTraining(tgrpc.TrainingServiceServicer):
    async def ListJobs(self, request: Any, context: Any) -> tpb.ListJobsResponse:
        return tpb.ListJobsResponse(jobs=[tpb.TrainingJob(id="job-1"), tpb.TrainingJob(id="job-2")])

    async def GetJob(self, request: Any, context: Any) -> tpb.GetJobResponse:
        return tpb.GetJobResponse(job=tpb.TrainingJob(id=request.job_id))


@dataclass
class Targets:
    serving: str
    control: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def targets(redis_server: Any) -> AsyncIterator[Targets]:
    from prometheus_client import CollectorRegistry

    from llmops.common.server import create_server
    from llmops.common.settings import Settings
    from llmops.serving.app import ServingApp

    settings = Settings.load(
        env={
            "LLMOPS_GRACE_SECONDS": "2",
            "LLMOPS_HEALTH_POLL_SECONDS": "0.05",
            "LLMOPS_SERVING_HTTP_ENABLED": "false",
            "LLMOPS_REDIS_URL": redis_server.url,
            "LLMOPS_CACHE_REDIS_TIMEOUT_MS": "2000",  # a loaded test machine must not time Redis out
        }
    )
    metrics = CollectorRegistry()
    app = ServingApp(settings, metrics, resolver=ChampionResolver(build_tiny_model().path))
    server, port = await create_server(
        "127.0.0.1:0", app.bindings(), settings, registry=metrics, metrics_port=0
    )
    await app.start()
    await app.service.load_model(
        LoadRequest(
            source=ModelSource(model_ref=ModelRef.parse("tiny@champion")),
            served_name=MODEL,
            engine=EngineKind.TRANSFORMERS,
        )
    )
    control = grpc.aio.server()
    rgrpc.add_RegistryServiceServicer_to_server(StubRegistry(), control)
    tgrpc.add_TrainingServiceServicer_to_server(StubTraining(), control)
    control_port = control.add_insecure_port("127.0.0.1:0")
    await control.start()
    try:
        yield Targets(f"127.0.0.1:{port}", f"127.0.0.1:{control_port}")
    finally:
        await control.stop(0)
        await server.stop(0)
        await app.close()


async def locust(*args: str, timeout: float = 60.0) -> tuple[int, str, float]:
    """Run Locust headless with the locustfile; (exit code, its output, seconds taken)."""
    started = time.monotonic()
    process = await create_subprocess_exec(  # tied: it dies with the test run
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, output.decode(errors="replace"), time.monotonic() - started


def stats_rows(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with Path(f"{prefix}_stats.csv").open(newline="") as handle:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


async def test_mixed_run_reports_every_entry(targets: Targets, tmp_path: Path) -> None:
    prefix = tmp_path / "run"
    # One user of each class (equal weights), so every entry is certain within 10 s; the mixed
    # class's own weights would leave the rare control-plane task to chance on a slow machine.
    code, output, _ = await locust(
        "MixedUser", "GenerateUser", "StreamUser", "CacheUser", "ControlUser",
        "-u", "5", "-r", "5", "-t", "10s", "--max-tokens", "8", "--cache-pool", "2", "--think-time", "0.05",
        "--serving", targets.serving, "--registry", targets.control, "--training", targets.control,
        "--csv", str(prefix), "--html", str(tmp_path / "report.html"),
    )  # fmt: skip
    assert code == 0, output
    rows = stats_rows(prefix)
    expected = [
        ("grpc", "serving.Generate"),
        ("grpc", "serving.GenerateStream"),
        ("grpc", "serving.Generate (cached)"),
        ("token", "TTFT"),
        ("token", "ITL"),
        ("grpc", "serving.ListModels"),
        ("grpc", "registry.ListModels"),
        ("grpc", "registry.ResolveAlias"),
        ("grpc", "training.ListJobs"),
        ("grpc", "training.GetJob"),
    ]
    for key in expected:
        assert key in rows, f"no {key} entry in {sorted(rows)}"
        assert int(rows[key]["Request Count"]) > 0, rows[key]
    assert all(int(row["Failure Count"]) == 0 for row in rows.values()), rows
    # ITL is one value per gap between token deltas: an 8-token stream has several.
    assert int(rows[("token", "ITL")]["Request Count"]) >= int(rows[("token", "TTFT")]["Request Count"])
    assert (tmp_path / "report.html").stat().st_size > 0
    summary = read_json(Path(f"{prefix}_summary.json"))
    assert summary["start"] < summary["end"]
    assert summary["target"]["model"] == MODEL
    assert not any(check["failed"] for check in summary["checks"]), summary["checks"]


async def test_impossible_threshold_fails_the_run(targets: Targets, tmp_path: Path) -> None:
    code, output, _ = await locust(
        "-u", "2", "-r", "2", "-t", "4s", "--scenario", "stream", "--max-tokens", "4",
        "--serving", targets.serving, "--max-p95-ttft-ms", "0.0001",
    )  # fmt: skip
    assert code == 3, output
    assert "thresholds exceeded: p95 TTFT" in output, output


async def test_missing_model_fails_before_the_run(targets: Targets) -> None:
    code, output, seconds = await locust(
        "-u", "1", "-t", "30s", "--serving", targets.serving, "--model", "nope"
    )
    assert code == 2, output
    assert "has no model 'nope'; loaded: tiny (READY)" in output, output
    assert seconds < 20


async def test_dead_address_fails_fast() -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, output, seconds = await locust("-u", "1", "-t", "30s", "--serving", f"127.0.0.1:{port}")
    assert code == 2, output
    assert f"serving ListModels at 127.0.0.1:{port} failed: UNAVAILABLE" in output, output
    assert seconds < 20
