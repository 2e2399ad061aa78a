"""Fuzz tests: every suite's RPCs as test parameters, and the session's counts at the end."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fuzz.harness import Tally, methods


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = getattr(metafunc.cls, "pb_module", None)
    if "method" in metafunc.fixturenames and module is not None:
        found = methods(module)
        metafunc.parametrize("method", found, ids=[m.name for m in found])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in Tally.lines():
        terminalreporter.write_line(line)
