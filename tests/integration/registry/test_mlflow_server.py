"""The registry as deployed: ``llmops serve registry`` in its own process, talking to a real
``mlflow server`` over HTTP, with files in MLflow's proxied artifact store (``mlflow-artifacts:``, the server's default artifact
root: no artifact root is configured, so nothing lands on the registry's own disk).

Invariants: the remote code paths work end to end — files are uploaded through MLflow's artifact
API, downloads stream from a verified local cache, and the tracking server (what the MLflow UI
reads) holds the registered model, its version tags, its run and its alias.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmops.common.artifacts.client import download_to_directory, upload_directory
from llmops.common.clients import RegistryClient
from llmops.common.process import popen, watch
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from tests.integration.registry.conftest import same_files
from tests.registry_support import mlflow_db

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(command: list[str], env: dict[str, str], stdout: int) -> subprocess.Popen[str]:
    # A session of its own, so _stop reaches the workers mlflow server forks; tied, and its group
    # handed to the reaper, so the server and its workers die with the test run, however it ends.
    process = popen(
        command,
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    watch(process.pid, group=True)
    return process


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the process group we started (mlflow server forks uvicorn workers), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def mlflow_server(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    port = _free_port()
    served = tmp_path / "served-artifacts"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", mlflow_db(tmp_path / "mlflow", tmp_path_factory.getbasetemp()),
        "--artifacts-destination", served.as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = _spawn(command, env, stdout=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}", served
    finally:
        _stop(proc)


async def _wait_http(url: str, timeout: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            with await asyncio.to_thread(urllib.request.urlopen, url, None, 2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


async def test_serve_registry_against_mlflow_server(
    mlflow_server: tuple[str, Path], llama_dir: Path, tmp_path: Path
) -> None:
    tracking_uri, served = mlflow_server
    env = {
        **os.environ,
        "LLMOPS_DATA_DIR": str(tmp_path / "data"),
        "LLMOPS_MLFLOW_TRACKING_URI": tracking_uri,
        "LLMOPS_GRACE_SECONDS": "5",
        # Fail fast while MLflow starts: the registry retries opening its store by itself.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    command = [
        sys.executable,
        "-m",
        "llmops.cli",
        "serve",
        "registry",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--host",
        "127.0.0.1",
    ]
    # Started together: the registry stays NOT_SERVING until MLflow answers.
    proc = _spawn(command, env, stdout=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 90)  # type: ignore[union-attr]
        match = re.search(r"listening grpc=(\d+)", line)
        assert match, line
        await _wait_http(f"{tracking_uri}/health")
        async with RegistryClient.connect(f"127.0.0.1:{match.group(1)}", timeout=60) as client:
            await client.wait_ready(timeout=60)
            meta = pb.VersionMetadata(
                model_name="remote", create_model=True, format=model_pb2.MODEL_FORMAT_FP32
            )
            meta.aliases.append("champion")
            version = await upload_directory(client, meta, llama_dir)
            assert version.artifact_uri.startswith("mlflow-artifacts:")
            written = await download_to_directory(
                client, model_pb2.ModelRef(name="remote", alias="champion"), tmp_path / "out"
            )
            assert len(written) == 4 and same_files(llama_dir, tmp_path / "out")

        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        assert mlflow.get_registered_model("remote").aliases == {"champion": str(version.version)}
        mv = mlflow.get_model_version("remote", str(version.version))
        assert mv.tags["llmops.manifest_sha256"] == version.manifest_sha256
        assert mlflow.get_run(mv.run_id).info.status == "FINISHED"
        assert any(p.name == "model.safetensors" for p in served.rglob("*"))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 30) == 0
    finally:
        _stop(proc)
