"""The registry process SIGKILLed during a download and an upload, then restarted on the same store.

Invariants: a download cut off by the kill ends with UNAVAILABLE (no hang) and leaves no partial
file — every file it did write matches the manifest's sha256; an upload cut off by the same kill ends
with UNAVAILABLE and leaves no model, no version, no MLflow run and no artifact file, and nothing in
staging once the registry is back; a call while the registry is down is UNAVAILABLE within seconds;
after the restart (same port, same MLflow SQLite store and artifact folder) the download retried
into the same folder succeeds byte for byte with a verified digest, and the upload retried succeeds
as version 1.

The registry runs as ``llmops serve registry`` in its own process, so the kill is a real crash
(no drain, no cleanup code runs). Beside it, ``tests/integration/registry/test_transfers.py`` covers
an upload the *client* cancels and a corrupt artifact (DATA_LOSS); this adds the server dying.

Allowances follow what the test measures: the registry's first start, and the whole upload of the
35 MB model made before the kill, set the bounds on the restart, on the transfers after it and on
a call to the dead registry, so a busy 2-core machine slows the test down without failing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from llmops.cache.redis_server import free_port
from llmops.common.artifacts.client import (
    PART_SUFFIX,
    download_to_directory,
    upload_directory,
    upload_requests,
)
from llmops.common.clients import RegistryClient
from llmops.common.errors import NotFound
from llmops.common.process import create_subprocess_exec
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from tests.faults.ledger import FaultCounts, record
from tests.registry_support import mlflow_db, write_llama

pytestmark = [pytest.mark.faults, pytest.mark.slow]

FP32 = model_pb2.MODEL_FORMAT_FP32
CHUNK = 64 * 1024
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass
class RegistryProcess:
    """``llmops serve registry`` on a fixed port; :meth:`kill` and :meth:`start` keep port and store."""

    root: Path
    tracking_uri: str
    port: int
    process: asyncio.subprocess.Process | None = None
    #: How long the last start took, to its "listening" line.
    started_in: float = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def artifact_root(self) -> Path:
        return self.root / "data" / "mlartifacts"

    @property
    def staging_dir(self) -> Path:
        return self.root / "data" / "registry" / "staging"

    async def start(self, timeout: float = 600.0) -> None:
        """Start it and wait for its "listening" line (it exits without one on failure; the
        ``timeout`` only catches a hang)."""
        env = {
            **os.environ,
            "LLMOPS_DATA_DIR": str(self.root / "data"),
            "LLMOPS_MLFLOW_TRACKING_URI": self.tracking_uri,
            "LLMOPS_GRACE_SECONDS": "2",
            "LLMOPS_HEALTH_POLL_SECONDS": "0.2",
        }
        command = [sys.executable, "-m", "llmops.cli", "serve", "registry", "--host", "127.0.0.1"]
        self.process = await create_subprocess_exec(  # tied: it dies with the test run
            *command, "--port", str(self.port), "--metrics-port", "0",
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        began = time.monotonic()
        line = (await asyncio.wait_for(self.process.stdout.readline(), timeout)).decode()
        self.started_in = time.monotonic() - began
        assert re.search(rf"listening grpc={self.port}\b", line), f"registry did not start: {line!r}"

    def kill(self) -> None:
        """SIGKILL the process group: a crash, nothing of the registry's shutdown runs."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.kill()
            await self.process.wait()
        self.process = None


@pytest_asyncio.fixture(loop_scope="session")
async def registry(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RegistryProcess]:
    running = RegistryProcess(
        tmp_path / "registry", mlflow_db(tmp_path / "mlflow", tmp_path_factory.getbasetemp()), free_port()
    )
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Allowances:
    """Bounds scaled from what this run measured: the registry's first start and one whole upload."""

    start: float
    upload: float

    @property
    def transfer(self) -> float:
        """A transfer as big as the measured upload, or a part of one: ten of those, at least 30 s."""
        return max(30.0, 10 * self.upload)

    @property
    def restart(self) -> float:
        return max(60.0, 4 * self.start)

    @property
    def refused(self) -> float:
        """A call to the dead registry: refused within a fraction of an upload's time, at least 5 s."""
        return max(5.0, self.upload)


async def until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_registry_killed_mid_transfer_loses_nothing(registry: RegistryProcess, tmp_path: Path) -> None:
    # ~35 MB: far more than the HTTP/2 windows and socket buffers hold (up to 6 MB seen arriving after
    # the kill), so the kill lands mid-stream.
    big = write_llama(tmp_path / "big", vocab=32768, hidden=256, intermediate=256, layers=1)
    other = write_llama(tmp_path / "other", vocab=4096, hidden=128, intermediate=256, seed=3)
    counts: FaultCounts = record("registry-restart")
    client = RegistryClient.connect(registry.address, timeout=30)
    try:
        await client.wait_ready(timeout=60, interval=0.05)
        meta = pb.VersionMetadata(model_name="big", create_model=True, format=FP32)
        began = time.monotonic()
        version = await upload_directory(client, meta, big, chunk_bytes=1024 * 1024)
        allow = Allowances(start=registry.started_in, upload=time.monotonic() - began)
        artifacts_before = files_under(registry.artifact_root)

        # An upload in flight: half its chunks sent (and staged by the server), the rest after the kill.
        killed = asyncio.Event()
        killed_at: list[float] = []
        cut_meta = pb.VersionMetadata(model_name="cut", create_model=True, format=FP32)
        requests = [r async for r in upload_requests(cut_meta, other, chunk_bytes=CHUNK)]

        async def slow_upload() -> AsyncIterator[pb.RegisterVersionRequest]:
            for index, message in enumerate(requests):
                if index == len(requests) // 2:
                    await killed.wait()
                yield message

        upload = asyncio.create_task(
            counts.call(
                partial(
                    client.client_stream,
                    client.stub.RegisterVersion,
                    slow_upload(),
                    timeout=2 * allow.transfer,
                ),
                bound=allow.transfer,
                allowed=UNAVAILABLE,
            )
        )
        await until(
            lambda: sum(p.stat().st_size for p in files_under(registry.staging_dir)) > 0, allow.transfer
        )

        # The download the kill lands in: as its second file (the weights) begins to arrive. Early,
        # since what is in flight (HTTP/2 windows, socket buffers; megabytes) still arrives after it.
        destination = tmp_path / "download"
        first_file = version.manifest[0].size_bytes

        received: list[int] = []

        def kill_once(done: int, total: int) -> None:
            received[:] = [done, total]
            if done > first_file and not killed.is_set():  # in the weights' first chunks
                registry.kill()
                counts.injected += 1
                killed_at.append(time.monotonic())
                killed.set()

        download = partial(
            download_to_directory, client, model_pb2.ModelRef(name="big", version=version.version),
            destination, chunk_bytes=CHUNK, progress=kill_once,
        )  # fmt: skip
        assert await counts.call(download, bound=allow.transfer, allowed=UNAVAILABLE) is None
        assert killed.is_set() and await upload is None
        assert counts.codes == {"UNAVAILABLE": 2}, counts.line()
        assert registry.process is not None
        await registry.process.wait()
        assert files_under(registry.staging_dir), "the crash should have left the upload's staged bytes"

        # Nothing partial on the client's disk: what is there is whole and verified.
        manifest = {f.path: f for f in version.manifest}
        written = files_under(destination)
        assert not any(p.name.endswith(PART_SUFFIX) for p in written)
        assert (destination / "model.safetensors") not in written
        for path in written:
            entry = manifest[str(path.relative_to(destination))]
            assert path.stat().st_size == entry.size_bytes and sha256(path) == entry.sha256

        # While the registry is down, a call is UNAVAILABLE within seconds, not a hang.
        request = pb.GetModelRequest(name="big")
        get = partial(client.unary, client.stub.GetModel, request, timeout=allow.refused)
        await counts.call(get, bound=2 * allow.refused, allowed=UNAVAILABLE)
        assert counts.codes == {"UNAVAILABLE": 3}

        await registry.start(allow.restart)  # same port, same store; it clears what the crash left in staging
        await client.wait_ready(timeout=allow.restart, interval=0.05)

        # The cut-off upload left nothing behind.
        async def no_cut_version() -> list[Any]:
            listed = pb.ListVersionsRequest(model_name="cut")
            try:
                response = await client.unary(client.stub.ListVersions, listed)
            except NotFound:
                return []  # not even the model: it is created only when a version commits
            return list(response.versions)

        await counts.call(
            no_cut_version, bound=allow.transfer, check=lambda found: f"versions {found}" if found else None
        )
        assert not any(registry.staging_dir.iterdir())
        assert files_under(registry.artifact_root) == artifacts_before
        assert _mlflow_runs(registry.tracking_uri, "cut") == 0

        # Retried, both succeed: the download verified byte for byte, the upload as version 1.
        def whole(files: list[Any]) -> str | None:
            for entry in version.manifest:
                path = destination / entry.path
                if sha256(path) != entry.sha256 or path.read_bytes() != (big / entry.path).read_bytes():
                    return f"{entry.path} differs from what was uploaded"
            return None if {f.path for f in files} == set(manifest) else f"wrote {files}"

        retried = partial(
            download_to_directory, client, model_pb2.ModelRef(name="big", version=version.version),
            destination, chunk_bytes=CHUNK,
        )  # fmt: skip
        await counts.call(retried, bound=2 * allow.transfer, check=whole)
        again = partial(upload_directory, client, cut_meta, other, chunk_bytes=CHUNK)
        uploaded = await counts.call(
            again,
            bound=2 * allow.transfer,
            check=lambda v: None if v.version == 1 and v.status == pb.VERSION_STATUS_READY else str(v),
        )
        assert uploaded is not None
        counts.seconds = time.monotonic() - killed_at[0]
        counts.note = (
            f"download_cut_at={received[0]}/{received[1]}B "
            f"upload_cut_at={len(requests) // 2}/{len(requests)}msgs "
            f"first_start={allow.start:.1f}s upload={allow.upload:.1f}s"
        )
        counts.assert_nothing_lost()
        assert counts.ok == 3 and counts.allowed == 3
    finally:
        await client.close()


def _mlflow_runs(tracking_uri: str, model: str) -> int:
    """Runs (in any state, deleted too) that the registry opened for ``model``."""
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=tracking_uri)
    experiments = mlflow.search_experiments(view_type=3)
    runs = mlflow.search_runs(
        [e.experiment_id for e in experiments],
        filter_string=f"tags.`llmops.model` = '{model}'",
        run_view_type=3,
    )
    return len(runs)
