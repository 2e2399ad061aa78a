"""A serving replica process for router tests: the real serving service (gRPC, health, WatchLoad,
HTTP) on the fake engine, with one model that reports a registry version.

    python -m tests.integration.router.replica --name tiny --version 1 --alias champion --step-delay 0.01

prints ``llmops serving listening grpc=PORT metrics=PORT http=PORT`` once the model is READY, and
serves until SIGTERM. The fake engine starts at once and can take ``--step-delay`` seconds per token,
so tests can hold requests in flight; a model reference ``name@alias`` or ``name:N`` resolves to the
version given here, so the router sees the versions a registry would give.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from llmops.common.app import start_app
from llmops.common.settings import Settings
from llmops.serving.app import ServingApp
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
from llmops.serving.resolver import ModelResolver


class PinnedResolver(ModelResolver):
    """Every reference resolves to one version, loaded from an empty folder (the fake engine reads none)."""

    def __init__(self, folder: Path, model: ResolvedModel) -> None:
        self.folder, self.model = folder, model

    async def resolve(self, source: ModelSource, *, adapter: bool = False) -> ResolvedSource:
        return ResolvedSource(path=self.folder, model=self.model)

    async def resolve_ref(self, ref: ModelRef) -> ResolvedModel:
        return self.model


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="tiny")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--faults", default="", help="serving.faults as JSON (a worse replica, on purpose)")
    parser.add_argument("--redis-url", default="", help="serving's own response cache on this Redis")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="llmops-replica-"))
    model = ResolvedModel(args.name, args.version, args.alias)

    def engines(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> FakeEngine:
        return FakeEngine(
            path, served_name, options, step_delay=args.step_delay, max_concurrency=args.concurrency
        )

    settings = Settings.load(
        env={
            "LLMOPS_HEALTH_POLL_SECONDS": "0.1",
            "LLMOPS_GRACE_SECONDS": "1",
            "LLMOPS_SERVING_HTTP_PORT": "0",
            **({"LLMOPS_SERVING_FAULTS": args.faults} if args.faults else {}),
            # serving's own response cache; Redis calls get 1 s (tests share two busy cores)
            **(
                {"LLMOPS_REDIS_URL": args.redis_url, "LLMOPS_CACHE_REDIS_TIMEOUT_MS": "1000"}
                if args.redis_url
                else {}
            ),
        }
    )

    def factory(s: Settings, registry: CollectorRegistry) -> ServingApp:
        return ServingApp(
            s, registry, engine_factory=engines, resolver=PinnedResolver(folder, model), http_host="127.0.0.1"
        )

    server, app = await start_app(factory, settings, host="127.0.0.1", port=args.port, metrics_port=0)
    assert isinstance(app, ServingApp)
    source = ModelSource(model_ref=ModelRef.parse(f"{args.name}@{args.alias}"))
    await app.service.load_model(
        LoadRequest(source=source, served_name=args.name, engine=EngineKind.TRANSFORMERS)
    )
    await server.refresh_readiness()
    server.install_signal_handlers()
    print(
        f"llmops serving listening grpc={server.port} metrics={server.metrics_http_port} http={app.http_port}",
        flush=True,
    )
    try:
        await server.wait_for_termination()
    finally:
        await app.close()


if __name__ == "__main__":
    asyncio.run(main())
