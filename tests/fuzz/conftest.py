"""Fuzz tests: every suite's RPCs as test parameters, and the session's counts at the end."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fuzz.harness import Tally, methods
from tests.fuzz.http_wire import HttpTally
from tests.fuzz.seeding import (  # noqa: F401 - this folder's hooks and autouse fixture
    _example_database_key,
    pytest_configure,
    pytest_report_header,
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = getattr(metafunc.cls, "pb_module", None)
    if "method" in metafunc.fixturenames and module is not None:
        found = methods(module)
        metafunc.parametrize("method", found, ids=[m.name for m in found])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in Tally.lines() + HttpTally.lines():
        terminalreporter.write_line(line)
