"""Quantization jobs on Ray, through the gRPC API: the runner code training jobs run on.

Invariants: a job submitted over gRPC runs in a Ray worker process, not in the service's (its
``started`` event names that worker's pid); its events arrive numbered without gaps from ``queued``
to ``finished``, with the quantizer's progress as ``quantize`` steps, and its result is registered;
CancelJob on a running job ends it CANCELLED within seconds (a worker busy measuring is killed after
the grace) and its Ray CPUs are free again.

The service runs on the test session's Ray runtime (``ray_runtime``), as it would join a cluster;
tracking is off (it is covered with the thread runner in ``test_mlflow_tracking.py``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from llmops.common.app import start_app
from llmops.common.clients import QuantizationClient
from llmops.common.runners.ray_runner import RayAttempt
from llmops.common.server import LLMOpsServer
from llmops.common.settings import Settings
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import dataset_pb2, job_pb2, model_pb2
from llmops.proto.quantization.v1 import quantization_service_pb2 as pb
from llmops.quantization.app import QuantizationApp, build_app

pytestmark = pytest.mark.slow


@dataclass
class Running:
    server: LLMOpsServer
    app: QuantizationApp
    client: QuantizationClient
    models_dir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def quantization(tmp_path_factory: pytest.TempPathFactory, ray_runtime: Path) -> AsyncIterator[Running]:
    data_dir = tmp_path_factory.mktemp("quantization-ray")
    models = data_dir / "quantization" / "models"
    shutil.copytree(build_tiny_model().path, models / "tiny" / "1")
    endpoint = {"port": 0, "metrics_port": 0}
    settings = Settings.model_validate(
        {
            "data_dir": str(data_dir),
            "health_poll_seconds": 0.05,
            "grace_seconds": 1.0,
            "quantization": {
                **endpoint,
                "address": "127.0.0.1:0",
                "runner": "ray",
                "default_cpus": 1,
                "poll_seconds": 0.1,
                "cancel_grace_seconds": 3.0,
                "tracking": False,
            },
        }
    )
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    assert isinstance(app, QuantizationApp)
    client = QuantizationClient.connect(f"127.0.0.1:{server.port}", timeout=60)
    await client.wait_ready(timeout=60, interval=0.05)
    yield Running(server, app, client, models)
    await client.close()
    await server.stop(0)
    await app.close()


def _spec(**fields: object) -> pb.QuantizationJobSpec:
    return pb.QuantizationJobSpec(
        source=model_pb2.ModelRef(name="tiny"),
        method=pb.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY,
        **fields,  # type: ignore[arg-type]
    )


def _evaluation(num_samples: int, seq_len: int, throughput_tokens: int = 0) -> pb.QuantizationEval:
    return pb.QuantizationEval(
        dataset=pb.DatasetSample(ref=dataset_pb2.DatasetRef(), num_samples=num_samples, seq_len=seq_len),
        measure_throughput=bool(throughput_tokens),
        throughput_tokens=throughput_tokens,
    )


def _pid(worker: str) -> int:
    """``<host> pid <pid>`` -> the pid."""
    host, _, pid = worker.rpartition(" pid ")
    assert host and pid.isdigit(), worker
    return int(pid)


def _cpus_return(total: float, within: float) -> bool:
    """Poll Ray until every CPU is free again (the worker's actor is gone)."""
    import ray

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= total:
            return True
        time.sleep(0.1)
    return False


async def test_a_job_runs_in_a_ray_worker_with_numbered_progress(quantization: Running) -> None:
    client = quantization.client
    job = (
        await client.unary(client.stub.SubmitJob, pb.SubmitJobRequest(spec=_spec(eval=_evaluation(2, 64))))
    ).job
    events = [r.event async for r in client.stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300)]

    kinds = [str(e.WhichOneof("payload")) for e in events]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "finished", events[-1]
    assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED
    started = events[1].started
    assert _pid(started.worker) != os.getpid()  # a Ray worker process, not this one
    quantize = [e.step.progress for e in events if e.HasField("step") and e.step.phase == "quantize"]
    assert len(quantize) >= 3 and quantize == sorted(quantize)  # the phase, then the quantizer's own
    assert 0.3 <= quantize[0] < quantize[-1] <= 0.7
    progress = [e.step.progress for e in events if e.HasField("step")]
    assert progress == sorted(progress)
    assert events[-1].finished.result.name == "tiny-int8-weight-only"

    done = (await client.unary(client.stub.GetJob, pb.GetJobRequest(job_id=job.id))).job
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED and done.progress == 1.0
    assert done.result.HasField("perplexity_after") and 0 < done.result.size_ratio < 0.5
    assert (quantization.models_dir / "tiny-int8-weight-only" / "1" / "version.json").is_file()


async def test_cancel_stops_a_running_job_within_seconds_and_frees_its_worker(quantization: Running) -> None:
    import ray

    client = quantization.client
    total_cpus = ray.cluster_resources()["CPU"]
    # a long measurement of the source, during which the worker does not look at its stop flag
    spec = _spec(eval=_evaluation(64, 512, throughput_tokens=1500))
    job = (await client.unary(client.stub.SubmitJob, pb.SubmitJobRequest(spec=spec))).job
    started = None
    async for response in client.stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=120):
        event = response.event
        if event.HasField("started"):
            started = event.started
        if event.HasField("step") and event.step.phase == "evaluate":
            break
    assert started is not None
    attempt = quantization.app.service.attempt(job.id)
    assert isinstance(attempt, RayAttempt)
    assert await asyncio.to_thread(attempt.pid) == _pid(started.worker) != os.getpid()
    assert ray.available_resources().get("CPU", 0) < total_cpus  # the worker holds its CPU

    asked = time.monotonic()
    response = await client.unary(client.stub.CancelJob, pb.CancelJobRequest(job_id=job.id, reason="enough"))
    assert response.job.cancel_requested
    rest = [r.event async for r in client.stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=60)]
    took = time.monotonic() - asked
    assert rest[-1].state == job_pb2.JOB_STATE_CANCELLED and rest[-1].cancelled.reason == "enough"
    assert took < 10, f"cancel took {took:.1f} s"
    assert await asyncio.to_thread(_cpus_return, total_cpus, 20.0)
    final = (await client.unary(client.stub.GetJob, pb.GetJobRequest(job_id=job.id))).job
    assert final.state == job_pb2.JOB_STATE_CANCELLED and not final.HasField("result")
