"""Session-wide engines for the serving tests: one tiny model build, one vLLM engine, one transformers engine.

vLLM takes 20-70 s to start on this CPU, so a single engine serves every test module; servers borrow
it through :class:`BorrowedEngine`, whose ``start`` and ``shutdown`` leave the shared engine alone.
The vLLM EngineCore runs in a spawned child process (``VLLM_WORKER_MULTIPROC_METHOD=spawn``, set by
the engine), with a 1 GiB KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmops.common.process import create_subprocess_exec
from llmops.common.tiny_model import build_tiny_model
from llmops.serving.domain import (
    ChatMessage,
    Decoding,
    EngineKind,
    EngineOptions,
    EngineOutput,
    EngineRequest,
    Tool,
)
from llmops.serving.engines.base import AdapterInfo, Engine, EngineStats

#: Small KV cache and context: other work shares this machine.
VLLM_OPTIONS = EngineOptions(kv_cache_bytes=1 << 30, max_model_len=1024, max_num_seqs=64)
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return build_tiny_model().path


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(tiny_model_path: Path) -> AsyncIterator[Engine]:
    pytest.importorskip("vllm")
    from llmops.serving.engines.vllm_engine import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMEngine(tiny_model_path, "tiny-vllm", VLLM_OPTIONS)
    started = time.perf_counter()
    await engine.start()
    TIMINGS["vllm_start_seconds"] = time.perf_counter() - started
    yield engine
    await engine.shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def transformers_engine(tiny_model_path: Path) -> AsyncIterator[Engine]:
    from llmops.serving.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_model_path, "tiny-hf", EngineOptions(max_model_len=1024))
    started = time.perf_counter()
    await engine.start()
    TIMINGS["transformers_start_seconds"] = time.perf_counter() - started
    yield engine
    await engine.shutdown()


class BorrowedEngine(Engine):
    """Lends a started session engine to a service: start and shutdown do nothing to it."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.model_path, inner.served_name, inner.options)
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]
        self.supported_controls = inner.supported_controls  # type: ignore[misc]
        self.exports_engine_metrics = inner.exports_engine_metrics  # type: ignore[misc]

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        return self.inner.generate(request)

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return await self.inner.tokenize(text, add_special_tokens=add_special_tokens)

    async def tokenize_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool, tools: Sequence[Tool] = ()
    ) -> list[int]:
        return await self.inner.tokenize_chat(
            messages, add_generation_prompt=add_generation_prompt, tools=tools
        )

    @property
    def chat_template(self) -> str:
        return self.inner.chat_template

    @property
    def hf_tokenizer(self) -> Any:
        return self.inner.hf_tokenizer

    @property
    def is_embedding_model(self) -> bool:
        return self.inner.is_embedding_model

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        return await self.inner.embed(inputs)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return await self.inner.detokenize(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return self.inner.token_strings(token_ids)

    async def health(self) -> bool:
        return await self.inner.health()

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def max_concurrency(self) -> int:
        return self.inner.max_concurrency

    def check_decoding(self, decoding: Decoding) -> None:
        self.inner.check_decoding(decoding)

    def check_options(self, options: EngineOptions) -> None:  # type: ignore[override]
        type(self.inner).check_options(options)

    def stats(self) -> EngineStats | None:
        return self.inner.stats()

    async def load_adapter(self, name: str, path: Path) -> AdapterInfo:
        return await self.inner.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.inner.unload_adapter(name)


def borrowing_factory(engines: dict[EngineKind, Engine]) -> Any:
    """An engine factory that lends the session engines (by kind) instead of starting new ones."""

    def factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> Engine:
        return BorrowedEngine(engines[kind])

    return factory


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for name, value in sorted(TIMINGS.items()):
        terminalreporter.write_line(f"serving: {name} = {value:.1f}")


class Stack:
    """A serving app on real servers: gRPC on 127.0.0.1 port 0, HTTP on 127.0.0.1 port 0."""

    def __init__(self, app: Any, server: Any, port: int, client: Any) -> None:
        self.app = app
        self.server = server
        self.port = port
        self.client = client

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_http_port}/metrics"


def serving_settings(**env: str) -> Any:
    from llmops.common.settings import Settings

    base = {
        "LLMOPS_GRACE_SECONDS": "5",
        "LLMOPS_HEALTH_POLL_SECONDS": "0.05",
        "LLMOPS_SERVING_HTTP_PORT": "0",
    }
    return Settings.load(env={**base, **env})


async def start_stack(factory: Any, settings: Any = None) -> Stack:
    from prometheus_client import CollectorRegistry

    from llmops.common.clients import ServingClient
    from llmops.common.server import create_server
    from llmops.serving.app import ServingApp
    from llmops.serving.resolver import LocalPathResolver

    settings = settings or serving_settings()
    registry = CollectorRegistry()
    app = ServingApp(
        settings, registry, engine_factory=factory, resolver=LocalPathResolver(), http_host="127.0.0.1"
    )
    server, port = await create_server(
        "127.0.0.1:0", app.bindings(), settings, registry=registry, metrics_port=0
    )
    await app.start()
    return Stack(app, server, port, ServingClient.connect(f"127.0.0.1:{port}", timeout=120))


async def start_registry_stack(
    settings: Any, factory: Any, resolver: Any, *, served_name: str, ref: str, api_key: str | None = None
) -> Stack:
    """A serving app whose one model is loaded as a registry version (``ref``), so the cache applies."""
    from prometheus_client import CollectorRegistry

    from llmops.common.clients import ServingClient
    from llmops.common.server import create_server
    from llmops.serving.app import ServingApp
    from llmops.serving.domain import LoadRequest, ModelRef, ModelSource

    registry = CollectorRegistry()
    app = ServingApp(settings, registry, engine_factory=factory, resolver=resolver, http_host="127.0.0.1")
    server, port = await create_server(
        "127.0.0.1:0", app.bindings(), settings, registry=registry, metrics_port=0
    )
    await app.start()
    source = ModelSource(model_ref=ModelRef.parse(ref))
    await app.service.load_model(
        LoadRequest(source=source, served_name=served_name, engine=EngineKind.TRANSFORMERS)
    )
    return Stack(app, server, port, ServingClient.connect(f"127.0.0.1:{port}", timeout=120, api_key=api_key))


async def stop_stack(stack: Stack) -> None:
    await stack.client.close()
    await stack.server.stop(0)
    await stack.app.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(
    vllm_engine: Engine, transformers_engine: Engine, tiny_model_path: Path
) -> AsyncIterator[Stack]:
    """Both real engines loaded through LoadModel: ``tiny-hf`` (transformers) and ``tiny-vllm``."""
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    factory = borrowing_factory({EngineKind.VLLM: vllm_engine, EngineKind.TRANSFORMERS: transformers_engine})
    s = await start_stack(factory)
    for name, engine in (("tiny-hf", pb.ENGINE_TRANSFORMERS), ("tiny-vllm", pb.ENGINE_VLLM)):
        request = pb.LoadModelRequest(local_path=str(tiny_model_path), served_name=name, engine=engine)
        await s.client.unary(s.client.stub.LoadModel, request)
    yield s
    await stop_stack(s)


@contextlib.asynccontextmanager
async def serving_process(
    tiny_model_path: Path, tmp_path: Path, *, grace: float, **env: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``llmops serve serving`` as a real process on the tiny model (transformers engine); yields the
    process and its gRPC address once it announced its ports (the model is loaded by then)."""
    import re
    import subprocess
    import sys

    variables = {
        **os.environ,
        "LLMOPS_HOST": "127.0.0.1",
        "LLMOPS_GRACE_SECONDS": str(grace),
        "LLMOPS_DATA_DIR": str(tmp_path),
        "LLMOPS_SERVING_MODEL": str(tiny_model_path),
        "LLMOPS_SERVING_SERVED_NAME": "tiny",
        "LLMOPS_SERVING_ENGINE": "transformers",
        "LLMOPS_SERVING_ENGINE_OPTIONS": '{"max_model_len": 1024}',
        **env,
    }
    process = await create_subprocess_exec(  # tied: it dies with the test run, however that ends
        *[sys.executable, "-m", "llmops.cli", "serve", "serving", "--port", "0", "--metrics-port", "0"],
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        # It prints its line once the model is loaded, or exits (the line is then empty): the bound only
        # catches a hang, and is wide, since a busy 2-core machine may take minutes to import and load.
        line = (await asyncio.wait_for(process.stdout.readline(), 600)).decode()
        match = re.search(r"grpc=(\d+)", line)
        assert match, f"no ports announced: {line!r}"
        yield process, f"127.0.0.1:{match.group(1)}"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
