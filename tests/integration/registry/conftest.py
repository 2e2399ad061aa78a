"""A real registry server on 127.0.0.1 port 0, started the way ``llmops serve registry`` starts it,
over an MLflow SQLite store and a local artifact folder in the test's temporary directory."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from llmops.common.app import start_app
from llmops.common.clients import RegistryClient
from llmops.common.server import LLMOpsServer
from llmops.common.settings import Settings
from llmops.registry.app import RegistryApp, build_app
from tests.registry_support import mlflow_db, write_llama


@dataclass
class RunningRegistry:
    server: LLMOpsServer
    app: RegistryApp
    client: RegistryClient
    settings: Settings
    root: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def artifact_root(self) -> Path:
        return self.root / "data" / "mlartifacts"

    @property
    def staging_dir(self) -> Path:
        return self.root / "data" / "registry" / "staging"


async def start_registry(root: Path, template_root: Path, **overrides: object) -> RunningRegistry:
    data = {
        "data_dir": str(root / "data"),
        "health_poll_seconds": 0.2,
        "grace_seconds": 2.0,
        "mlflow_tracking_uri": mlflow_db(root / "mlflow", template_root),
    }
    data.update(overrides)
    settings = Settings.model_validate(data)
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    assert isinstance(app, RegistryApp)
    client = RegistryClient.connect(f"127.0.0.1:{server.port}", timeout=60)
    await client.wait_ready(timeout=60)
    return RunningRegistry(server, app, client, settings, root)


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


async def stop_registry(running: RunningRegistry) -> None:
    watchdog = asyncio.get_running_loop().call_later(30, _dump_tasks)  # where a stuck stop waits
    try:
        async with asyncio.timeout(60):  # a stuck shutdown fails here, not at the 10-minute timeout
            await running.client.close()
            await running.server.stop(0)
            await running.app.close()
    finally:
        watchdog.cancel()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningRegistry]:
    running = await start_registry(tmp_path_factory.mktemp("registry"), tmp_path_factory.getbasetemp())
    yield running
    await stop_registry(running)


def same_files(expected: Path, actual: Path) -> bool:
    """True when ``actual`` holds exactly the files of ``expected``, byte for byte."""
    want = {p.relative_to(expected): p.read_bytes() for p in expected.rglob("*") if p.is_file()}
    have = {p.relative_to(actual): p.read_bytes() for p in actual.rglob("*") if p.is_file()}
    return want == have


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("llama") / "model")
