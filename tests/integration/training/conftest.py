"""A training stack on 127.0.0.1 port 0, wired the way ``llmops serve training`` wires it: a real
registry server (MLflow on SQLite, holding the tiny model as ``tiny:1``), the session's local Ray
runtime for the workers, MLflow tracking in the registry's store, and a DVC data repository (a Git
work tree with ``dvc init``) whose SFT file has two committed revisions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmops.common.app import start_app
from llmops.common.artifacts.client import upload_directory
from llmops.common.clients import TrainingClient
from llmops.common.server import LLMOpsServer
from llmops.common.settings import Settings
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import dataset_pb2, job_pb2, model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.proto.training.v1 import training_service_pb2 as pb
from llmops.training.app import TrainingApp, build_app
from tests.integration.registry.conftest import RunningRegistry, start_registry, stop_registry


def sft_rows(count: int) -> list[dict[str, str]]:
    return [{"prompt": f"def add_{i}(x):\n", "completion": f"    return x + {i}\n"} for i in range(count)]


def chat_rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You write Python."},
                {"role": "user", "content": f"Add {i} to x."},
                {"role": "assistant", "content": f"return x + {i}"},
            ]
        }
        for i in range(count)
    ]


def preference_rows(count: int) -> list[dict[str, str]]:
    return [
        {
            "prompt": f"def add_{i}(x):\n",
            "chosen": f"    return x + {i}\n",
            "rejected": f"    return x - {i}\n",
        }
        for i in range(count)
    ]


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _run(repo: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@dataclass
class DataRepo:
    root: Path
    first_commit: str
    head_commit: str


def make_data_repo(root: Path) -> DataRepo:
    """Git + DVC: ``data/sft.jsonl`` (DVC-tracked) has 24 rows at the first commit and 32 at HEAD."""
    root.mkdir(parents=True)
    _run(root, "git", "init", "-q", "-b", "main")
    _run(root, "git", "config", "user.email", "tests@llmops.invalid")
    _run(root, "git", "config", "user.name", "llmops tests")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    data = root / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text(_jsonl(sft_rows(24)))
    (data / "chat.jsonl").write_text(_jsonl(chat_rows(16)))
    (data / "prefs.jsonl").write_text(_jsonl(preference_rows(16)))
    (data / "bad.jsonl").write_text(_jsonl(sft_rows(2)) + "{not json\n" + _jsonl(sft_rows(2)))
    _run(root, sys.executable, "-m", "dvc", "add", "-q", "data/sft.jsonl")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "data v1")
    first = _run(root, "git", "rev-parse", "HEAD")
    (data / "sft.jsonl").write_text(_jsonl(sft_rows(32)))
    _run(root, sys.executable, "-m", "dvc", "add", "-q", "data/sft.jsonl")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "data v2")
    return DataRepo(root, first, _run(root, "git", "rev-parse", "HEAD"))


@dataclass
class TrainingStack:
    server: LLMOpsServer
    app: TrainingApp
    client: TrainingClient
    settings: Settings


async def start_training(settings: Settings) -> TrainingStack:
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    assert isinstance(app, TrainingApp)
    client = TrainingClient.connect(f"127.0.0.1:{server.port}", timeout=60)
    await client.wait_ready(timeout=60, interval=0.05)
    return TrainingStack(server, app, client, settings)


async def stop_training(stack: TrainingStack) -> None:
    await stack.client.close()
    await stack.server.stop(0)
    await stack.app.close()


@dataclass
class Stack:
    registry: RunningRegistry
    repo: DataRepo
    data_dir: Path
    settings: Callable[..., Settings]
    training: TrainingStack

    @property
    def client(self) -> TrainingClient:
        return self.training.client


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory, ray_runtime: Path) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("training")
    registry = await start_registry(root / "registry", tmp_path_factory.getbasetemp())
    await upload_directory(
        registry.client,
        rpb.VersionMetadata(
            model_name="tiny", create_model=True, format=model_pb2.MODEL_FORMAT_FP32, aliases=["champion"]
        ),
        build_tiny_model().path,
    )
    repo = make_data_repo(root / "datarepo")
    data_dir = root / "data"

    def settings(**training: object) -> Settings:
        endpoint = {"port": 0, "metrics_port": 0}
        return Settings.model_validate(
            {
                "data_dir": str(data_dir),
                "health_poll_seconds": 0.05,
                "grace_seconds": 1.0,
                "mlflow_tracking_uri": registry.settings.mlflow_tracking_uri,
                "registry": {**endpoint, "address": registry.address},
                "training": {
                    **endpoint,
                    "address": "127.0.0.1:0",
                    "data_repo": str(repo.root),
                    "poll_seconds": 0.1,
                    "cancel_grace_seconds": 5.0,
                    **training,
                },
            }
        )

    training = await start_training(settings())
    yield Stack(registry, repo, data_dir, settings, training)
    await stop_training(training)
    await stop_registry(registry)


def spec(
    path: str = "data/sft.jsonl",
    *,
    method: int = pb.TRAINING_METHOD_LORA,
    revision: str = "",
    base: model_pb2.ModelRef | None = None,
    lora: bool = True,
    **hyperparameters: Any,
) -> pb.TrainingJobSpec:
    hyperparameters.setdefault("max_steps", 6)
    hyperparameters.setdefault("per_device_batch_size", 4)
    hyperparameters.setdefault("logging_every_steps", 1)
    message = pb.TrainingJobSpec(
        base_model=base or model_pb2.ModelRef(name="tiny", version=1),
        dataset=pb.TrainingDataset(ref=dataset_pb2.DatasetRef(path=path, revision=revision)),
        method=method,  # type: ignore[arg-type]
        hyperparameters=pb.Hyperparameters(**hyperparameters),
    )
    if lora:
        message.lora.SetInParent()
    return message


async def submit(
    client: TrainingClient, job_spec: pb.TrainingJobSpec, request_id: str = ""
) -> pb.TrainingJob:
    response = await client.unary(
        client.stub.SubmitJob, pb.SubmitJobRequest(spec=job_spec, request_id=request_id)
    )
    job: pb.TrainingJob = response.job
    return job


async def events(client: TrainingClient, job_id: str, timeout: float = 300) -> list[job_pb2.JobEvent]:
    """Every event of a job, to its terminal one."""
    request = pb.WatchJobRequest(job_id=job_id, include_logs=True)
    return [r.event async for r in client.stub.WatchJob(request, timeout=timeout)]


def kinds(found: list[job_pb2.JobEvent]) -> list[str]:
    return [str(e.WhichOneof("payload")) for e in found]
