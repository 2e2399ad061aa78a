"""Builders for service tests on the fake engine: no sockets, no model files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from llmops.serving.config import ServingConfig
from llmops.serving.domain import (
    EngineKind,
    EngineOptions,
    LoadRequest,
    ModelRef,
    ModelSource,
    ResolvedModel,
    ResolvedSource,
)
from llmops.serving.engines.fake import FakeEngine
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.resolver import ModelResolver
from llmops.serving.service import ServingService


class StaticResolver(ModelResolver):
    """Any source resolves to a made-up folder; registry refs resolve to version 1 (or 2 when moved)."""

    def __init__(self) -> None:
        self.version = 1

    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        if source.model_ref is not None:
            ref = source.model_ref
            return ResolvedSource(
                Path("/models") / ref.name, ResolvedModel(ref.name, self.version, ref.alias or "")
            )
        return ResolvedSource(Path(source.local_path or "/models/local"))

    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        return ResolvedModel(ref.name, ref.version or self.version, ref.alias or "")


class Harness:
    """A service whose engines are fakes; ``engines`` holds every fake it built."""

    def __init__(self, max_waiting: int = 4, **fake_args: object) -> None:
        self.registry = CollectorRegistry()
        self.resolver = StaticResolver()
        self.engines: list[FakeEngine] = []
        self.fake_args = {"context": 2048, **fake_args}
        self.service = ServingService(
            self.factory,
            self.resolver,
            ServingMetrics(self.registry),
            EngineShimMetrics(),
            ServingConfig(default_engine=EngineKind.FAKE, max_waiting=max_waiting, alias_poll_seconds=0.05),
        )

    def factory(self, kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> FakeEngine:
        engine = FakeEngine(path, served_name, options, **self.fake_args)  # type: ignore[arg-type]
        self.engines.append(engine)
        return engine

    async def load(self, name: str = "fake", **kwargs: object) -> None:
        await self.service.load_model(
            LoadRequest(ModelSource(local_path=f"/models/{name}"), served_name=name, **kwargs)
        )  # type: ignore[arg-type]

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
def harness_factory() -> Callable[..., Harness]:
    return Harness
