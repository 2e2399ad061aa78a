"""Fuzzing the training service (real gRPC server on port 0, real validation, data and job store).

Invariant: whatever any training RPC is sent — fuzzed job specs and hyperparameters, mutations of a
valid LoRA submission, job ids, page tokens, undecodable bytes, an oversized message — the answer is
OK or a caller-error status with a message, never INTERNAL/UNKNOWN/UNAVAILABLE; afterwards the
server is SERVING and a valid submission is accepted and can be read back.

What is not real here: job bodies. Every submission that passes validation runs a body on a thread
that trains nothing (it waits a moment, then fails), so a fuzzed ``max_steps`` of 2**31 costs no
CPU; bases come from a local models folder, not the registry service.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from llmops.common.app import start_app
from llmops.common.clients import TrainingClient
from llmops.common.settings import Settings
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import dataset_pb2, job_pb2, model_pb2
from llmops.proto.training.v1 import training_service_pb2 as pb
from llmops.training.app import TrainingApp, build_app
from llmops.training.domain import WorkerPlan
from llmops.training.runners.local import ThreadRunner
from tests.fuzz.suite import JobServiceFuzz, Target
from tests.integration.training.conftest import chat_rows, preference_rows, sft_rows

pytestmark = pytest.mark.fuzz


def _trains_nothing(plan: WorkerPlan, emit: Any, stop: threading.Event) -> dict[str, Any]:
    stop.wait(0.2)
    raise RuntimeError("the fuzz stack trains nothing")


def _spec(**hyperparameters: Any) -> pb.TrainingJobSpec:
    message = pb.TrainingJobSpec(
        base_model=model_pb2.ModelRef(name="tiny", version=1),
        dataset=pb.TrainingDataset(ref=dataset_pb2.DatasetRef(path="data/sft.jsonl")),
        method=pb.TRAINING_METHOD_LORA,
        hyperparameters=pb.Hyperparameters(max_steps=2, per_device_batch_size=2, **hyperparameters),
        tags={"fuzz": "yes"},
    )
    message.lora.SetInParent()
    return message


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    root = tmp_path_factory.mktemp("training-fuzz")
    shutil.copytree(build_tiny_model().path, root / "models" / "tiny" / "1")
    data = root / "repo" / "data"
    data.mkdir(parents=True)
    for name, rows in (("sft", sft_rows(8)), ("chat", chat_rows(4)), ("prefs", preference_rows(4))):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    endpoint = {"port": 0, "metrics_port": 0, "address": "127.0.0.1:0"}
    settings = Settings.model_validate(
        {
            "data_dir": str(root / "data"),
            "health_poll_seconds": 0.05,
            "grace_seconds": 1.0,
            "training": {
                **endpoint,
                "runner": "thread",
                "use_registry": False,
                "models_dir": str(root / "models"),
                "data_repo": str(root / "repo"),
                "tracking": False,
                "poll_seconds": 0.05,
                "cancel_grace_seconds": 1.0,
                "max_queued_jobs": 4,
            },
        }
    )

    def factory(s: Settings, registry: CollectorRegistry) -> TrainingApp:
        return build_app(s, registry, runner=ThreadRunner(_trains_nothing))

    server, app = await start_app(factory, settings, host="127.0.0.1", port=0, metrics_port=0)
    client = TrainingClient.connect(f"127.0.0.1:{server.port}", timeout=30)
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        await client.wait_ready(timeout=30, interval=0.05)
        job = (await client.stub.SubmitJob(pb.SubmitJobRequest(spec=_spec()), timeout=30)).job
        TestTrainingFuzz.seeds = _seeds(job.id)

        async def known_good() -> None:
            # Fuzzed submissions may fill the queue: wait for it to drain, then submit once more.
            for _ in range(200):
                listed = await client.stub.ListJobs(
                    pb.ListJobsRequest(states=[job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING]),
                    timeout=30,
                )
                if not listed.jobs:
                    break
                for queued in listed.jobs:
                    await client.stub.CancelJob(pb.CancelJobRequest(job_id=queued.id), timeout=30)
            again = (await client.stub.SubmitJob(pb.SubmitJobRequest(spec=_spec()), timeout=30)).job
            found = (await client.stub.GetJob(pb.GetJobRequest(job_id=again.id), timeout=30)).job
            assert found.id == again.id

        yield Target(
            channel, "llmops.training.v1.TrainingService", known_good, settings.max_message_bytes, address
        )
    finally:
        await channel.close()
        await client.close()
        await server.stop(0)
        await app.close()


def _seeds(job_id: str) -> dict[str, list[object]]:
    return {
        "SubmitJob": [
            pb.SubmitJobRequest(spec=_spec(learning_rate=1e-4), request_id="fuzz-1"),
            pb.SubmitJobRequest(spec=_spec(eval_split=0.25, max_seq_length=64)),
        ],
        "GetJob": [pb.GetJobRequest(job_id=job_id)],
        "ListJobs": [pb.ListJobsRequest(page_size=2, states=[job_pb2.JOB_STATE_FAILED])],
        "CancelJob": [pb.CancelJobRequest(job_id=job_id, reason="fuzz")],
        "WatchJob": [pb.WatchJobRequest(job_id=job_id, include_logs=True)],
    }


class TestTrainingFuzz(JobServiceFuzz):
    pb_module = pb
    service = "training"
    examples = 25
