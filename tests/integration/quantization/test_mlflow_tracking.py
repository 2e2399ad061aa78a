"""Every quantization job is one MLflow run, in a real MLflow store (SQLite in the test's folder):
the run is named after the job and created when it starts (the started event, GetJob and the
registered version's lineage carry its id); it holds the method's settings and the evaluation
settings as parameters, the held-out text as a dataset input, the measured sizes, perplexities and
speeds as metrics and the result folder under ``model``; and it is already FINISHED when a watcher
sees the terminal event. A store that cannot be reached when the job starts fails the job with a
one-line UNAVAILABLE-style reason and the server keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmops.common.app import ServiceApp, start_app
from llmops.common.clients import QuantizationClient
from llmops.common.server import LLMOpsServer
from llmops.common.settings import Settings
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import dataset_pb2, job_pb2, model_pb2
from llmops.proto.quantization.v1 import quantization_service_pb2 as pb
from llmops.quantization.app import build_app
from tests.registry_support import mlflow_db

pytestmark = pytest.mark.slow


@dataclass
class Running:
    server: LLMOpsServer
    app: ServiceApp
    client: QuantizationClient
    data_dir: Path
    tracking_uri: str


async def _start(data_dir: Path, tracking_uri: str) -> Running:
    settings = Settings.model_validate(
        {
            "data_dir": str(data_dir),
            "health_poll_seconds": 0.05,
            "grace_seconds": 1.0,
            "mlflow_tracking_uri": tracking_uri,
            # jobs on Ray: test_ray_jobs.py
            "quantization": {"port": 0, "metrics_port": 0, "address": "127.0.0.1:0", "runner": "thread"},
        }
    )
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    client = QuantizationClient.connect(f"127.0.0.1:{server.port}", timeout=30)
    await client.wait_ready(timeout=20, interval=0.02)
    return Running(server, app, client, data_dir, tracking_uri)


async def _stop(running: Running) -> None:
    await running.client.close()
    await running.server.stop(0)
    await running.app.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def quantization(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    data_dir = tmp_path_factory.mktemp("quantization-mlflow")
    shutil.copytree(build_tiny_model().path, data_dir / "quantization" / "models" / "tiny" / "1")
    running = await _start(data_dir, mlflow_db(data_dir / "mlflow", tmp_path_factory.getbasetemp()))
    yield running
    await _stop(running)


def _mlflow(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


async def _events(client: QuantizationClient, job_id: str) -> list[job_pb2.JobEvent]:
    return [r.event async for r in client.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=180)]


async def test_job_is_one_run_with_its_settings_data_measurements_and_files(
    quantization: Running, tmp_path: Path
) -> None:
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(400)))
    client = quantization.client
    spec = pb.QuantizationJobSpec(
        source=model_pb2.ModelRef(name="tiny"),
        method=pb.QUANTIZATION_METHOD_INT8_DYNAMIC,
        eval=pb.QuantizationEval(
            dataset=pb.DatasetSample(
                ref=dataset_pb2.DatasetRef(path=str(heldout)), num_samples=2, seq_len=64
            ),
            measure_throughput=True,
            throughput_tokens=8,
        ),
        tags={"team": "search"},
    )
    job = (await client.unary(client.stub.SubmitJob, pb.SubmitJobRequest(spec=spec))).job
    events = await _events(client, job.id)
    assert events[-1].WhichOneof("payload") == "finished", events[-1]

    # The run is closed by the time the terminal event arrives.
    started = next(e for e in events if e.WhichOneof("payload") == "started")
    run_id = started.started.mlflow_run_id
    assert run_id
    mlflow = _mlflow(quantization.tracking_uri)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == job.id
    done = (await client.unary(client.stub.GetJob, pb.GetJobRequest(job_id=job.id))).job
    assert done.mlflow_run_id == run_id
    assert mlflow.get_experiment(run.info.experiment_id).name == "llmops-quantization"

    tags = run.data.tags
    assert tags["llmops.job_id"] == job.id and tags["llmops.method"] == "int8_dynamic"
    assert tags["llmops.source"] == "tiny:1" and tags["user.team"] == "search"
    params = run.data.params
    assert {k: params[k] for k in ("method", "bits", "group_size", "gguf_type", "device")} == {
        "method": "int8_dynamic",
        "bits": "8",
        "group_size": "0",
        "gguf_type": "",
        "device": "cpu",
    }
    assert (params["eval.num_samples"], params["eval.seq_len"], params["eval.throughput_tokens"]) == (
        "2",
        "64",
        "8",
    )
    result = done.result
    metrics = run.data.metrics
    assert metrics["size_bytes_before"] == result.size_bytes_before
    assert metrics["size_bytes_after"] == result.size_bytes_after
    assert metrics["size_ratio"] == pytest.approx(result.size_ratio)
    assert metrics["perplexity_before"] == pytest.approx(result.perplexity_before)
    assert metrics["perplexity_after"] == pytest.approx(result.perplexity_after)
    assert metrics["tokens_per_second_before"] == pytest.approx(result.tokens_per_second_before)
    assert metrics["tokens_per_second_after"] == pytest.approx(result.tokens_per_second_after)

    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.source_type) == ("heldout.txt", "local")
    assert json.loads(dataset.source) == {"path": str(heldout)}
    assert dataset.digest == hashlib.sha256(heldout.read_bytes()).hexdigest()[:36]
    assert {(t.key, t.value) for t in dataset_input.tags} == {("mlflow.data.context", "evaluation")}

    artifacts = {a.path for a in mlflow.list_artifacts(run_id, "model")}
    output = quantization.data_dir / "quantization" / "work" / job.id
    assert artifacts == {f"model/{p.name}" for p in output.iterdir()}
    assert "model/llmops_quantization.json" in artifacts

    # The registered version names the run in its lineage.
    version = result.result_version
    record = json.loads(
        (
            quantization.data_dir
            / "quantization"
            / "models"
            / version.name
            / str(version.version)
            / "version.json"
        ).read_text()
    )
    assert record["mlflow_run_id"] == run_id and record["job_id"] == job.id


async def test_unreachable_store_fails_the_job_with_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(build_tiny_model().path, data_dir / "quantization" / "models" / "tiny" / "1")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the store's folder cannot be created under a file
    running = await _start(data_dir, f"sqlite:///{blocker / 'mlflow.db'}")
    try:
        client = running.client
        spec = pb.QuantizationJobSpec(
            source=model_pb2.ModelRef(name="tiny"), method=pb.QUANTIZATION_METHOD_INT8_DYNAMIC
        )
        job = (await client.unary(client.stub.SubmitJob, pb.SubmitJobRequest(spec=spec))).job
        events = await _events(client, job.id)
        assert [e.WhichOneof("payload") for e in events] == ["queued", "failed"]
        failed = (await client.unary(client.stub.GetJob, pb.GetJobRequest(job_id=job.id))).job
        assert failed.state == job_pb2.JOB_STATE_FAILED and failed.mlflow_run_id == ""
        assert failed.error_message.startswith("MLflow tracking store unreachable: ")
        assert "\n" not in failed.error_message and "Traceback" not in failed.error_message
        assert events[-1].failed.reason == failed.error_message
        assert not (data_dir / "quantization" / "models" / "tiny-int8-dynamic").exists()
        # the server still answers
        listed = await client.unary(client.stub.ListJobs, pb.ListJobsRequest())
        assert [j.id for j in listed.jobs] == [job.id]
    finally:
        await _stop(running)
