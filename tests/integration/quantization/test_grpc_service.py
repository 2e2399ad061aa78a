"""QuantizationService over real gRPC on 127.0.0.1 port 0, started the way ``llmops serve
quantization`` starts it: a submitted job streams its events to the terminal one through WatchJob,
its result is registered as a child version with the measurements, and bad input maps to the
documented status codes (a table per RPC).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmops.common.app import ServiceApp, start_app
from llmops.common.clients import QuantizationClient
from llmops.common.errors import LLMOpsError
from llmops.common.process import create_subprocess_exec
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
    models_dir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def quantization(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    data_dir = tmp_path_factory.mktemp("quantization")
    models = data_dir / "quantization" / "models"
    shutil.copytree(build_tiny_model().path, models / "tiny" / "1")
    already = models / "already" / "1"
    shutil.copytree(models / "tiny" / "1", already)
    config = json.loads((already / "config.json").read_text())
    (already / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "x"}}))
    settings = Settings.load(
        env={
            "LLMOPS_DATA_DIR": str(data_dir),
            "LLMOPS_HEALTH_POLL_SECONDS": "0.05",
            "LLMOPS_GRACE_SECONDS": "1",
            "LLMOPS_QUANTIZATION_RUNNER": "thread",  # jobs on Ray: test_ray_jobs.py
            # jobs are tracked; a pre-migrated store spares the seconds a new SQLite one takes
            "LLMOPS_MLFLOW_TRACKING_URI": mlflow_db(data_dir / "mlflow", tmp_path_factory.getbasetemp()),
        }
    )
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    client = QuantizationClient.connect(f"127.0.0.1:{server.port}", timeout=30)
    await client.wait_ready(timeout=20, interval=0.02)
    yield Running(server, app, client, models)
    await client.close()
    await server.stop(0)
    await app.close()


def _spec(name: str = "tiny", **fields: object) -> pb.QuantizationJobSpec:
    fields.setdefault("method", pb.QUANTIZATION_METHOD_INT8_DYNAMIC)
    return pb.QuantizationJobSpec(source=model_pb2.ModelRef(name=name), **fields)  # type: ignore[arg-type]


def _gptq_at(path: str, revision: str) -> pb.QuantizationJobSpec:
    ref = dataset_pb2.DatasetRef(path=path, revision=revision)
    return _spec(method=pb.QUANTIZATION_METHOD_GPTQ, calibration=pb.DatasetSample(ref=ref, num_samples=2))


def _evaluated_on(path: str) -> pb.QuantizationJobSpec:
    ref = dataset_pb2.DatasetRef(path=path)
    return _spec(eval=pb.QuantizationEval(dataset=pb.DatasetSample(ref=ref, num_samples=2, seq_len=64)))


async def test_job_streams_events_to_the_end_and_registers_its_result(quantization: Running) -> None:
    client = quantization.client
    evaluation = pb.QuantizationEval(
        dataset=pb.DatasetSample(ref=dataset_pb2.DatasetRef(), num_samples=2, seq_len=64),
        measure_throughput=True,
        throughput_tokens=8,
    )
    submitted = await client.unary(
        client.stub.SubmitJob, pb.SubmitJobRequest(spec=_spec(eval=evaluation), request_id="once")
    )
    job = submitted.job
    assert job.state == job_pb2.JOB_STATE_QUEUED and job.spec.source.version == 1
    events = [r.event async for r in client.stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=180)]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].WhichOneof("payload") == "queued"
    assert events[-1].WhichOneof("payload") == "finished"
    assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED
    assert events[-1].finished.result.name == "tiny-int8-dynamic"
    assert events[-1].finished.metrics["size_ratio"] < 0.4

    done = (await client.unary(client.stub.GetJob, pb.GetJobRequest(job_id=job.id))).job
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED and done.progress == 1.0
    result = done.result
    assert 0 < result.size_ratio < 0.4 and result.size_bytes_after < result.size_bytes_before
    assert result.HasField("perplexity_before") and result.HasField("perplexity_after")
    assert result.HasField("tokens_per_second_after")
    assert result.format == model_pb2.MODEL_FORMAT_INT8
    assert (result.result_version.name, result.result_version.version) == ("tiny-int8-dynamic", 1)
    record = json.loads((quantization.models_dir / "tiny-int8-dynamic" / "1" / "version.json").read_text())
    assert record["parent_name"] == "tiny" and record["metrics"]["size_ratio"] == pytest.approx(
        result.size_ratio
    )

    again = await client.unary(client.stub.SubmitJob, pb.SubmitJobRequest(spec=_spec(), request_id="once"))
    assert again.job.id == job.id
    listed = await client.unary(
        client.stub.ListJobs, pb.ListJobsRequest(states=[job_pb2.JOB_STATE_SUCCEEDED])
    )
    assert [j.id for j in listed.jobs] == [job.id]
    with pytest.raises(LLMOpsError) as caught:
        await client.unary(client.stub.CancelJob, pb.CancelJobRequest(job_id=job.id))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        (_spec(method=pb.QUANTIZATION_METHOD_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT),
        (_spec(method=pb.QUANTIZATION_METHOD_GPTQ), grpc.StatusCode.INVALID_ARGUMENT),
        (
            _spec(method=pb.QUANTIZATION_METHOD_INT4_WEIGHT_ONLY, group_size=48),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (_spec(method=pb.QUANTIZATION_METHOD_GGUF, gguf_type="Q5_K_M"), grpc.StatusCode.INVALID_ARGUMENT),
        (_spec(bits=4), grpc.StatusCode.INVALID_ARGUMENT),
        (_spec(name="missing"), grpc.StatusCode.NOT_FOUND),
        (_spec(name="already"), grpc.StatusCode.FAILED_PRECONDITION),
        # calibration data at a revision of the data repository: read there at submission
        (_gptq_at("data/calibration.jsonl", "no-such-revision"), grpc.StatusCode.NOT_FOUND),
        (_gptq_at("", "v1"), grpc.StatusCode.INVALID_ARGUMENT),
        (_gptq_at("/etc/hostname", "v1"), grpc.StatusCode.INVALID_ARGUMENT),
        # paths the file system refuses are the caller's error, never INTERNAL
        (_gptq_at("/tmp/" + "c" * 300, ""), grpc.StatusCode.INVALID_ARGUMENT),
        (_gptq_at("/etc/hostname/x", ""), grpc.StatusCode.NOT_FOUND),
        (_evaluated_on("/tmp/" + "e" * 300), grpc.StatusCode.INVALID_ARGUMENT),
        (_evaluated_on("/no/such/eval.txt"), grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_bad_submit_maps_to_its_status(
    quantization: Running, spec: pb.QuantizationJobSpec, code: grpc.StatusCode
) -> None:
    client = quantization.client
    with pytest.raises(LLMOpsError) as caught:
        await client.unary(client.stub.SubmitJob, pb.SubmitJobRequest(spec=spec))
    assert caught.value.code == code


@pytest.mark.parametrize("rpc", ["GetJob", "CancelJob"])
async def test_unknown_job_is_not_found(quantization: Running, rpc: str) -> None:
    client = quantization.client
    request = pb.GetJobRequest(job_id="qj-nope") if rpc == "GetJob" else pb.CancelJobRequest(job_id="qj-nope")
    with pytest.raises(LLMOpsError) as caught:
        await client.unary(getattr(client.stub, rpc), request)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def _cli(quantization: Running, *args: str) -> tuple[int, str, str]:
    process = await create_subprocess_exec(  # tied: it dies with the test run
        sys.executable,
        "-c",
        "from llmops.cli import main; main()",
        "quantize",
        *args,
        "--address",
        f"127.0.0.1:{quantization.server.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_submits_watches_lists_and_reports_errors(quantization: Running) -> None:
    code, stdout, _ = await _cli(
        quantization, "submit", "tiny:1", "--method", "gguf", "--no-register", "--watch", "--json"
    )
    assert code == 0, stdout
    job = json.loads(stdout)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["result"]["format"] == "MODEL_FORMAT_GGUF"
    assert "result_version" not in job["result"]
    code, stdout, _ = await _cli(quantization, "list", "--state", "succeeded", "--json")
    assert code == 0 and job["id"] in {j["id"] for j in json.loads(stdout)["jobs"]}
    code, _, stderr = await _cli(quantization, "cancel", "qj-nope")
    assert code == 1 and "NOT_FOUND" in stderr
