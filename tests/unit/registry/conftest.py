"""Fixtures of the registry unit tests: tiny model folders, a service on the fake store, both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from llmops.registry.metrics import RegistryMetrics
from llmops.registry.service import RegistryService
from llmops.registry.stores.base import RegistryStore
from llmops.registry.stores.fake import FakeRegistryStore
from llmops.registry.stores.mlflow_store import MlflowRegistryStore
from tests.registry_support import mlflow_db, write_llama


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture
def service(tmp_path: Path) -> RegistryService:
    store = FakeRegistryStore(tmp_path / "artifacts")
    service = RegistryService(store, tmp_path / "staging", RegistryMetrics(CollectorRegistry()))
    service.clear_staging()
    return service


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MlflowRegistryStore]:
    root = tmp_path_factory.mktemp("mlflow-store")
    store = MlflowRegistryStore(
        tracking_uri=mlflow_db(root, tmp_path_factory.getbasetemp()),
        artifact_root=(root / "artifacts").as_uri(),
        alias_db_url=f"sqlite:///{root / 'aliases.db'}",
        cache_dir=root / "cache",
    )
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=["fake", "mlflow"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> RegistryStore:
    """Each store implementation in turn (the conformance suite runs against every one)."""
    if request.param == "fake":
        return FakeRegistryStore(tmp_path / "fake-artifacts")
    store: RegistryStore = request.getfixturevalue("mlflow_store")
    return store
