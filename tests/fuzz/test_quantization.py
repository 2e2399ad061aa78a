"""Fuzzing the quantization service (real gRPC server on port 0, jobs on threads, local models).

Invariant: whatever any quantization RPC is sent — fuzzed specs (methods, bits, group sizes, GGUF
types, calibration and eval samples), mutations of a valid INT8 submission, job ids, undecodable
bytes, an oversized message — the answer is OK or a caller-error status with a message, never
INTERNAL/UNKNOWN/UNAVAILABLE; afterwards the server is SERVING and a valid submission is accepted.

Submissions that pass validation really quantize the tiny model (one worker, at most two pending,
so the queue answers RESOURCE_EXHAUSTED rather than the CPU filling up).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llmops.common.app import start_app
from llmops.common.clients import QuantizationClient
from llmops.common.settings import Settings
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import job_pb2, model_pb2
from llmops.proto.quantization.v1 import quantization_service_pb2 as pb
from llmops.quantization.app import build_app
from tests.fuzz.suite import JobServiceFuzz, Target
from tests.registry_support import mlflow_db

pytestmark = pytest.mark.fuzz

SPEC = pb.QuantizationJobSpec(
    source=model_pb2.ModelRef(name="tiny", version=1),
    method=pb.QUANTIZATION_METHOD_INT8_DYNAMIC,
    register=False,
    tags={"fuzz": "yes"},
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    data_dir = tmp_path_factory.mktemp("quantization-fuzz")
    shutil.copytree(build_tiny_model().path, data_dir / "quantization" / "models" / "tiny" / "1")
    settings = Settings.load(
        env={
            "LLMOPS_DATA_DIR": str(data_dir),
            "LLMOPS_HEALTH_POLL_SECONDS": "0.05",
            "LLMOPS_GRACE_SECONDS": "1",
            "LLMOPS_QUANTIZATION_RUNNER": "thread",
            "LLMOPS_QUANTIZATION_MAX_PENDING": "2",
            "LLMOPS_QUANTIZATION_CANCEL_GRACE_SECONDS": "1",
            "LLMOPS_MLFLOW_TRACKING_URI": mlflow_db(data_dir / "mlflow", tmp_path_factory.getbasetemp()),
        }
    )
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    client = QuantizationClient.connect(f"127.0.0.1:{server.port}", timeout=30)
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        await client.wait_ready(timeout=30, interval=0.05)
        job = (await client.stub.SubmitJob(pb.SubmitJobRequest(spec=SPEC), timeout=30)).job
        TestQuantizationFuzz.seeds = _seeds(job.id)

        async def known_good() -> None:
            active = [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING]
            for queued in (await client.stub.ListJobs(pb.ListJobsRequest(states=active), timeout=30)).jobs:
                await client.stub.CancelJob(pb.CancelJobRequest(job_id=queued.id), timeout=30)
            found = (await client.stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=30)).job
            assert found.id == job.id

        yield Target(
            channel,
            "llmops.quantization.v1.QuantizationService",
            known_good,
            settings.max_message_bytes,
            address,
        )
    finally:
        await channel.close()
        await client.close()
        await server.stop(0)
        await app.close()


def _seeds(job_id: str) -> dict[str, list[object]]:
    int4 = pb.QuantizationJobSpec()
    int4.CopyFrom(SPEC)
    int4.method, int4.bits, int4.group_size = pb.QUANTIZATION_METHOD_INT4_WEIGHT_ONLY, 4, 32
    return {
        "SubmitJob": [pb.SubmitJobRequest(spec=SPEC, request_id="fuzz-1"), pb.SubmitJobRequest(spec=int4)],
        "GetJob": [pb.GetJobRequest(job_id=job_id)],
        "ListJobs": [pb.ListJobsRequest(page_size=2, source_model_name="tiny")],
        "CancelJob": [pb.CancelJobRequest(job_id=job_id, reason="fuzz")],
        "WatchJob": [pb.WatchJobRequest(job_id=job_id, include_logs=True)],
    }


class TestQuantizationFuzz(JobServiceFuzz):
    pb_module = pb
    service = "quantization"
    examples = 15
