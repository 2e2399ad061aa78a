"""A served model's folder is handed back to the resolver (its node-cache entry becomes evictable)
when the model is replaced by another version or unloaded, and not before."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from llmops.serving.config import ServingConfig
from llmops.serving.domain import EngineKind, EngineOptions, LoadRequest, ModelSource
from llmops.serving.engines.fake import FakeEngine
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.service import ServingService
from tests.unit.serving.conftest import StaticResolver


class RecordingResolver(StaticResolver):
    def __init__(self) -> None:
        super().__init__()
        self.released: list[Path] = []

    def release(self, path: Path) -> None:
        self.released.append(path)


def factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> FakeEngine:
    return FakeEngine(path, served_name, options, context=2048)


@pytest.mark.parametrize("unload_first", [False, True])
async def test_replaced_and_unloaded_models_release_their_folders(unload_first: bool) -> None:
    resolver = RecordingResolver()
    config = ServingConfig(default_engine=EngineKind.FAKE, replace_unloads_first=unload_first)
    service = ServingService(
        factory, resolver, ServingMetrics(CollectorRegistry()), EngineShimMetrics(), config
    )
    await service.load_model(LoadRequest(ModelSource(local_path="/models/v1"), served_name="m"))
    assert resolver.released == []  # served: held
    await service.load_model(LoadRequest(ModelSource(local_path="/models/v2"), served_name="m", replace=True))
    assert resolver.released == [Path("/models/v1")]
    await service.close()
    assert resolver.released == [Path("/models/v1"), Path("/models/v2")]
