"""Fault tests: real Redis, registry and serving processes, each broken on purpose under load.

Fixtures shared by the fault tests, and the run's summary: one ``faults: ...`` line per fault with
what was injected and what the clients saw (see :mod:`tests.faults.ledger`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmops.common.tiny_model import build_tiny_model
from tests.faults.ledger import RECORDED
from tests.redis_fixture import make_redis_server

__all__ = ["make_redis_server", "tiny_model_path"]


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return build_tiny_model().path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for counts in RECORDED:
        terminalreporter.write_line(counts.line())
