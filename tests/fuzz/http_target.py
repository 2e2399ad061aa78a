"""The serving app the HTTP fuzz tests attack: real gRPC and HTTP servers on port 0, the transformers
engine on the tiny model (a 128-token context, ``max_tokens`` capped at 16, so a fuzzed generation
stays cheap), one model loaded as ``tiny-fuzz``; a keep-alive connection to it; the hypothesis
budget (fixed and derandomized in ``make test``, random-seeded in ``make fuzz``).

``LLMOPS_FUZZ_HTTP_ENGINE=fake`` puts the in-process fake engine (a character-level model, same
sampling code, no torch model) behind the same app instead: a big budget then spends its time on
the HTTP layer under test rather than on the tiny model's forward passes.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, Phase, seed, settings

from llmops.common.tiny_model import build_tiny_model
from llmops.serving.domain import EngineKind, EngineOptions, LoadRequest, ModelSource
from llmops.serving.engines.base import Engine
from tests.fuzz.harness import EXAMPLES_ENV
from tests.fuzz.http_wire import Connection, Dropped, ErrorLog, HttpTally, Reply, json_request, problem_with
from tests.fuzz.openai_bodies import MODEL
from tests.fuzz.seeding import Seed
from tests.integration.serving.conftest import (
    Stack,
    borrowing_factory,
    serving_settings,
    start_stack,
    stop_stack,
)

ENGINE_ENV = "LLMOPS_FUZZ_HTTP_ENGINE"
F = TypeVar("F", bound=Callable[..., Any])


def http_budget(default: int, share: float = 1.0) -> Callable[[F], F]:
    """``default`` examples, derandomized (``make test``); with ``LLMOPS_FUZZ_EXAMPLES`` that many
    times ``share``, from the fuzz session's seed (``make fuzz FUZZ_SEED=N``, else drawn; see
    ``tests.fuzz.seeding``), which the session summary prints."""
    examples = int(int(os.environ.get(EXAMPLES_ENV, "0") or 0) * share)
    common: dict[str, Any] = {
        "database": None,
        "deadline": None,
        "print_blob": False,
        # No shrinking: each step is a request to a real server, and the failure shows its input.
        "phases": (Phase.explicit, Phase.generate),
        "suppress_health_check": list(HealthCheck),
    }
    if not examples:
        fixed = settings(max_examples=default, derandomize=True, **common)
        return lambda test: fixed(test)  # type: ignore[no-any-return]
    if HttpTally.seed is None:
        # One seed for the whole fuzz session: the RPC fuzzers' (set from --hypothesis-seed or drawn
        # in tests.fuzz.seeding), so ``make fuzz FUZZ_SEED=N`` repeats the HTTP inputs too.
        HttpTally.seed = Seed.value if Seed.value is not None else random.SystemRandom().getrandbits(32)
    chosen = settings(max_examples=examples, **common)
    return lambda test: seed(HttpTally.seed)(chosen(test))  # type: ignore[no-any-return]


@dataclass
class HttpTarget:
    stack: Stack
    port: int
    errors: ErrorLog
    engine: Any
    connection: Connection | None = None
    reopened: int = 0
    notes: list[str] = field(default_factory=list)

    async def exchange(self, data: bytes, timeout: float = 60.0) -> Reply:
        """Send ``data`` on the keep-alive connection (a fresh one after the server closed the last,
        which only a 413 or a transport error may do) and read the reply."""
        if self.connection is None:
            self.connection = await Connection.open(self.port)
            self.reopened += 1
        try:
            await self.connection.send(data)
            reply = await self.connection.reply(timeout)
        except (Dropped, ConnectionError):
            await self.forget()
            raise
        if reply.closes:
            await self.forget()
        return reply

    async def forget(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    async def judged(self, endpoint: str, data: bytes) -> str | None:
        """Send ``data``, record the answer for ``endpoint``; why it is wrong, or None."""
        try:
            reply = await self.exchange(data)
        except (Dropped, ConnectionError, TimeoutError) as exc:
            HttpTally.record(endpoint, "dropped", "dropped")
            return f"the connection was dropped: {exc!r}"
        logged = self.logged()  # read (and cleared) whatever the reply says
        problem = problem_with(reply, stream=True) or logged
        HttpTally.record(endpoint, reply.status, problem)
        return problem

    def logged(self) -> str | None:
        if self.errors.records:
            lines = self.errors.lines()
            self.errors.records.clear()
            return f"the server logged errors: {lines}"
        return None

    async def healthy(self) -> None:
        """Health is 200 and a known-good completion answers 4 tokens, on a fresh connection."""
        connection = await Connection.open(self.port)
        try:
            await connection.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await connection.reply()).status == 200
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            await connection.send(json_request("/v1/completions", body))
            reply = await connection.reply()
            assert reply.status == 200, reply
            assert reply.json()["usage"]["completion_tokens"] == 4
        finally:
            await connection.close()
        assert not self.errors.records, self.errors.lines()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http_target() -> AsyncIterator[HttpTarget]:
    from llmops.serving.engines.fake import FakeEngine
    from llmops.serving.engines.transformers_engine import TransformersEngine

    path = build_tiny_model().path
    engine: Engine
    if os.environ.get(ENGINE_ENV, "transformers") == "fake":
        engine = FakeEngine(path, MODEL, EngineOptions(max_model_len=128))
    else:
        engine = TransformersEngine(path, MODEL, EngineOptions(max_model_len=128))
    await engine.start()
    stack = await start_stack(
        borrowing_factory({EngineKind.TRANSFORMERS: engine}),
        serving_settings(LLMOPS_SERVING_MAX_TOKENS_LIMIT="16"),
    )
    errors = ErrorLog()
    errors.install()
    try:
        source = ModelSource(local_path=str(path))
        await stack.app.service.load_model(
            LoadRequest(source=source, served_name=MODEL, engine=EngineKind.TRANSFORMERS)
        )
        assert stack.app.http_port is not None
        yield HttpTarget(stack, stack.app.http_port, errors, engine)
    finally:
        errors.remove()
        await stop_stack(stack)
        await engine.shutdown()


__all__ = ["HttpTarget", "http_budget", "http_target", "pytest"]
