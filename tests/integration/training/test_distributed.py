"""Data-parallel training on a real two-node Ray cluster, with the service as its own process.

The cluster is two ``ray start`` nodes of one CPU each (a head and a worker node) with separate
temp folders (and TMPDIR, where each rank keeps its scratch checkpoints): they share nothing but
the job store (dataset snapshots, results) and the configured Ray Train checkpoint storage. The
training service runs as ``llmops serve training`` joined to the head, so the tests can kill it.

Invariants: two workers at per-device batch 4 log the loss of one worker at batch 8 (same seed,
data order, no dropout) within 0.01 at every step, with one rank on each node and every rank's step
time in the step events; a killed worker makes Ray Train restart the group from the last checkpoint,
with no step lost or repeated after it; a service killed mid-job finds the same job on its next
start and follows it to its registered result (one attempt, never run twice); ``llmops train
submit --num-workers 2`` starts it and ``llmops train watch`` shows it; cancel stops every rank.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
import yaml

from benchmarks.training.ray_cluster import BIN, RayCluster, free_port, ray_env, start_cluster, stop_cluster
from llmops.common.artifacts.client import upload_directory
from llmops.common.clients import TrainingClient
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import job_pb2, model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.proto.training.v1 import training_service_pb2 as pb
from tests.integration.registry.conftest import RunningRegistry, start_registry, stop_registry
from tests.integration.training.conftest import DataRepo, make_data_repo, spec, submit

pytestmark = pytest.mark.slow

RANK = re.compile(r"rank (\d+) runs on .* pid (\d+)")
RESUMED = re.compile(r"workers resume from step (\d+)")


@dataclass
class Service:
    """``llmops serve training`` as a child process, joined to the cluster's head."""

    config: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    client: TrainingClient | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> TrainingClient:
        log = (self.config.parent / "service.log").open("ab")
        self.process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [BIN / "llmops", "serve", "training", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ray_env(),
        )
        self.client = TrainingClient.connect(self.address, timeout=60)
        await self.client.wait_ready(timeout=180, interval=0.2)
        return self.client

    async def kill(self) -> None:
        """A crash: SIGKILL, no drain."""
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
            self.process = None


@dataclass
class Stack:
    cluster: RayCluster
    registry: RunningRegistry
    repo: DataRepo
    service: Service
    storage: Path

    @property
    def client(self) -> TrainingClient:
        assert self.service.client is not None
        return self.service.client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("ddp")
    # Ray Train registers a reported checkpoint when its controller next polls the workers (every
    # 2 s by default): polled often here, a worker killed after a checkpoint event resumes from it.
    # The cluster starts while the registry does.
    starting = asyncio.ensure_future(
        asyncio.to_thread(start_cluster, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    )
    try:
        registry = await start_registry(root / "registry", tmp_path_factory.getbasetemp())
    except BaseException:
        stop_cluster(await starting)
        raise
    try:
        cluster = await starting
    except BaseException:
        await stop_registry(registry)
        raise
    try:
        async for found in _stack(root, cluster, registry):
            yield found
    finally:
        stop_cluster(cluster)


async def _stack(root: Path, cluster: RayCluster, registry: RunningRegistry) -> AsyncIterator[Stack]:
    await upload_directory(
        registry.client,
        rpb.VersionMetadata(model_name="tiny", create_model=True, format=model_pb2.MODEL_FORMAT_FP32),
        build_tiny_model().path,
    )
    repo = make_data_repo(root / "datarepo")
    storage = root / "checkpoints"
    port = free_port()
    config = root / "training.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(root / "data"),
                "ray_address": cluster.address,
                "health_poll_seconds": 0.1,
                "grace_seconds": 1.0,
                "mlflow_tracking_uri": registry.settings.mlflow_tracking_uri,
                "registry": {"port": 0, "metrics_port": 0, "address": registry.address},
                "training": {
                    "port": port,
                    "metrics_port": 0,
                    "address": f"127.0.0.1:{port}",
                    "data_repo": str(repo.root),
                    "poll_seconds": 0.1,
                    "cancel_grace_seconds": 5.0,
                    "default_cpus": 1.0,
                    "checkpoint_storage": str(storage),
                },
            }
        )
    )
    service = Service(config, port)
    try:
        await service.start()
        yield Stack(cluster, registry, repo, service, storage)
    finally:
        await service.stop()
        await stop_registry(registry)


def _ddp_spec(**hyperparameters: Any) -> pb.TrainingJobSpec:
    message = spec(**hyperparameters)
    message.lora.dropout = 0.0  # dropout off (an explicit 0): the runs compare step by step
    return message


async def _follow(
    client: TrainingClient, job_id: str, until: Any = None, from_sequence: int = 0
) -> list[job_pb2.JobEvent]:
    """Events from ``from_sequence`` to the terminal one, or to the first for which ``until`` is true."""
    found = []
    request = pb.WatchJobRequest(job_id=job_id, include_logs=True, from_sequence=from_sequence)
    async for response in client.stub.WatchJob(request, timeout=600):
        found.append(response.event)
        if until is not None and until(found):
            break
    return found


def _train_steps(found: list[job_pb2.JobEvent]) -> list[tuple[int, float]]:
    return [
        (e.step.step, e.step.loss)
        for e in found
        if e.HasField("step") and e.step.phase == "train" and e.step.loss
    ]


def _story(found: list[job_pb2.JobEvent]) -> str:
    """The events in short, for a failing assertion's message."""
    lines = []
    for event in found:
        kind = str(event.WhichOneof("payload"))
        detail = f"{event.step.phase} {event.step.step}" if kind == "step" else ""
        lines.append(f"{event.sequence} {kind} {detail or (event.log.message if kind == 'log' else '')}")
    return "\n".join(lines)


def _ranks(found: list[job_pb2.JobEvent]) -> dict[int, int]:
    """Rank -> pid, from the coordinator's ``rank N runs on <host> pid P`` lines (the latest wins)."""
    ranks = {}
    for event in found:
        if event.HasField("log") and (match := RANK.search(event.log.message)):
            ranks[int(match[1])] = int(match[2])
    return ranks


async def test_two_workers_log_one_workers_loss_at_the_same_global_batch(stack: Stack) -> None:
    one = await submit(stack.client, _ddp_spec(max_steps=6, per_device_batch_size=8))
    two_spec = _ddp_spec(max_steps=6, per_device_batch_size=4)
    two_spec.num_workers = 2
    two = await submit(stack.client, two_spec)
    one_events = await _follow(stack.client, one.id)
    two_events = await _follow(stack.client, two.id)
    assert one_events[-1].HasField("finished") and two_events[-1].HasField("finished"), two_events[-1]

    one_steps, two_steps = _train_steps(one_events), _train_steps(two_events)
    assert [s for s, _ in two_steps] == [s for s, _ in one_steps] == list(range(1, 7))
    assert max(abs(a - b) for (_, a), (_, b) in zip(one_steps, two_steps, strict=True)) <= 0.01
    ranks = _ranks(two_events)
    assert sorted(ranks) == [0, 1]
    per_worker = [
        e.step.metrics for e in two_events if e.HasField("step") and e.step.phase == "train" and e.step.loss
    ]
    assert {"worker0_step_seconds", "worker1_step_seconds"} <= set(per_worker[-1])
    checkpoint = two_events[-1].finished
    assert checkpoint.HasField("result")
    assert (stack.storage / two.id).is_dir()  # checkpoints went through Ray Train's storage


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "llmops"), *args],
        capture_output=True,
        text=True,
        env=ray_env(),
        timeout=timeout,
        check=False,
    )


async def test_a_killed_worker_and_a_restarted_service_lose_no_step_and_run_once(stack: Stack) -> None:
    submitted = await asyncio.to_thread(
        _cli,
        "train", "submit", "tiny:1", "data/sft.jsonl", "--num-workers", "2", "--max-steps", "150",
        "--batch-size", "2", "--checkpoint-every", "5", "--log-every", "1", "--lora-dropout", "0",
        "--cpus", "1", "--address", stack.service.address, "--json",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]

    def checkpointed(found: list[job_pb2.JobEvent]) -> bool:
        return len(_ranks(found)) == 2 and any(e.HasField("checkpoint") for e in found)

    before = await _follow(stack.client, job_id, checkpointed)
    ranks = _ranks(before)
    assert {stack.cluster.node_of(pid) for pid in ranks.values()} == {0, 1}  # one rank on each node
    os.kill(ranks[1], signal.SIGKILL)

    def resumed_and_checkpointed(found: list[job_pb2.JobEvent]) -> bool:
        resumed = [i for i, e in enumerate(found) if e.HasField("log") and RESUMED.search(e.log.message)]
        return bool(resumed) and any(e.HasField("checkpoint") for e in found[resumed[0] :])

    during = await _follow(
        stack.client, job_id, resumed_and_checkpointed, from_sequence=before[-1].sequence + 1
    )
    assert not during[-1].HasField("finished"), _story(before + during)
    await stack.service.kill()  # a crash mid-job: the job runs on in the cluster
    client = await stack.service.start()
    found = await _follow(client, job_id)

    story = _story(found)
    assert found[-1].HasField("finished"), story
    assert any(e.HasField("log") and RESUMED.search(e.log.message) for e in found), story
    steps = [s for s, _ in _train_steps(found)]
    resume_at = next(int(m[1]) for e in found if e.HasField("log") and (m := RESUMED.search(e.log.message)))
    cut = next(i for i, e in enumerate(found) if e.HasField("log") and RESUMED.search(e.log.message))
    after_resume = [s for s, _ in _train_steps(found[cut:])]
    assert after_resume == list(range(resume_at + 1, 151))  # from the checkpoint, no gap or repeat
    first = [s for s, _ in _train_steps(found[:cut])]
    assert first == list(range(1, len(first) + 1)) and first[-1] >= resume_at
    assert steps[-1] == 150
    assert any(e.HasField("log") and "follows the job" in e.log.message for e in found), story
    assert [e.HasField("started") for e in found].count(True) == 1  # one attempt: never started twice
    assert len(during) > 0
    job = (await client.unary(client.stub.GetJob, pb.GetJobRequest(job_id=job_id))).job
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED and job.current_step == 150

    result = found[-1].finished.result
    version = (
        await stack.registry.client.unary(
            stack.registry.client.stub.GetVersion,
            rpb.GetVersionRequest(model=model_pb2.ModelRef(name=result.name, version=result.version)),
        )
    ).version
    assert version.lineage.job_id == job_id and version.lineage.job_kind == job_pb2.JOB_KIND_TRAINING
    assert (version.lineage.parent.name, version.lineage.parent.version) == ("tiny", 1)

    watched = await asyncio.to_thread(_cli, "train", "watch", job_id, "--address", stack.service.address)
    assert watched.returncode == 0, watched.stderr
    assert f"registered {result.name}:{result.version}" in watched.stderr + watched.stdout


async def test_cancel_stops_every_worker(stack: Stack) -> None:
    job_spec = _ddp_spec(max_steps=400, per_device_batch_size=2)
    job_spec.num_workers = 2
    job = await submit(stack.client, job_spec)
    found = await _follow(stack.client, job.id, lambda f: len(_ranks(f)) == 2 and bool(_train_steps(f)))
    pids = list(_ranks(found).values())
    coordinator = next(int(e.started.worker.rpartition(" pid ")[2]) for e in found if e.HasField("started"))
    await stack.client.unary(stack.client.stub.CancelJob, pb.CancelJobRequest(job_id=job.id, reason="test"))
    rest = await _follow(stack.client, job.id, from_sequence=found[-1].sequence + 1)
    assert rest[-1].HasField("cancelled")
    deadline = time.monotonic() + 60
    while alive := [p for p in [*pids, coordinator] if _running(p)]:
        assert time.monotonic() < deadline, f"processes {alive} outlived the cancel"
        await asyncio.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
