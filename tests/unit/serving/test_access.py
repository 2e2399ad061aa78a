"""A serving process checks callers with one set of API keys and charges one rate limiter.

Invariants: the gRPC runtime, the OpenAI HTTP API and the generation path share the app's
:class:`~llmops.common.access.Access` (one ``Authenticator``, one limiter and so one Redis client),
and closing the app closes that limiter's client. Without keys there is no limiter and no HTTP check.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from llmops.common.auth import Role, key_entry, new_key
from llmops.common.settings import Settings
from llmops.serving.app import ServingApp
from llmops.serving.engines.fake import FakeEngine
from tests.unit.serving.conftest import StaticResolver


def _app(tmp_path: Path, *, keys: bool) -> ServingApp:
    env = {"LLMOPS_REDIS_URL": "redis://127.0.0.1:1/0"}
    if keys:
        path = tmp_path / "keys.yaml"
        document = {
            "tenants": {"t": {"requests_per_minute": 60}},
            "keys": [key_entry(new_key(), "a", "t", Role.USER)],
        }
        path.write_text(yaml.safe_dump(document))
        env["LLMOPS_API_KEYS_FILE"] = str(path)
    return ServingApp(
        Settings.load(env=env),
        CollectorRegistry(),
        engine_factory=lambda kind, path, name, options: FakeEngine(path, name, options),
        resolver=StaticResolver(),
    )


async def test_grpc_http_and_generation_share_one_limiter_closed_with_the_app(tmp_path: Path) -> None:
    app = _app(tmp_path, keys=True)
    access = app.access()
    assert access.authenticator.enabled and access.limiter is not None
    assert app.service.limiter is access.limiter  # token budgets charge the same limiter
    closed = []
    limiter_close = access.limiter.close

    async def counted_close() -> None:
        closed.append(True)
        await limiter_close()

    access.limiter.close = counted_close  # type: ignore[method-assign]
    await app.close()
    assert closed == [True]


async def test_without_keys_there_is_no_limiter_and_no_http_check(tmp_path: Path) -> None:
    app = _app(tmp_path, keys=False)
    assert not app.access().authenticator.enabled
    assert app.access().limiter is None and app.service.limiter is None
    await app.close()
