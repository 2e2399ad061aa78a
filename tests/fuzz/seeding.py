"""Which inputs a fuzz run draws: the same ones every time under ``make test``, new ones under
``make fuzz``.

``make test`` runs a small derandomized budget with no example database: the same inputs on every
machine, so the suite stays a fixed smoke. ``make fuzz`` sets ``LLMOPS_FUZZ_RANDOM=1``: every run
draws new inputs from a seed it prints (``fuzz: seed N``; ``make fuzz FUZZ_SEED=N`` draws the same
ones again, through hypothesis' ``--hypothesis-seed``), and hypothesis keeps the inputs that failed
in an example database under ``build/hypothesis`` (one key per test and RPC), which the next run
tries first.

The hooks and the fixture are imported by ``tests/fuzz/conftest.py``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

#: Set (to 1) by ``make fuzz``: new inputs every run, failing ones kept in the example database.
RANDOM_ENV = "LLMOPS_FUZZ_RANDOM"
#: Where the example database lives (default ``build/hypothesis`` in the repository).
DATABASE_ENV = "LLMOPS_FUZZ_DATABASE"
ROOT = Path(__file__).resolve().parents[2]


def randomized() -> bool:
    return os.environ.get(RANDOM_ENV, "") not in ("", "0")


def database_dir() -> Path:
    return Path(os.environ.get(DATABASE_ENV) or ROOT / "build" / "hypothesis")


class Seed:
    """The seed of this session's randomized run (``None`` under ``make test``)."""

    value: int | None = None

    @classmethod
    def line(cls) -> str | None:
        if cls.value is None:
            return None
        return (
            f"fuzz: seed {cls.value} (new inputs; again: make fuzz FUZZ_SEED={cls.value}); "
            f"failing inputs kept in {database_dir()}"
        )


def pytest_configure(config: pytest.Config) -> None:
    if not randomized():
        return
    from hypothesis import core

    given = config.getoption("hypothesis_seed", None)
    Seed.value = int(given) if given is not None else secrets.randbelow(2**32)
    # what --hypothesis-seed does; a seed drawn here is applied the same way
    core.global_force_seed = Seed.value


def pytest_report_header(config: pytest.Config) -> str:
    return Seed.line() or "fuzz: fixed inputs (derandomized; make fuzz draws new ones)"


@pytest.fixture(autouse=True)
def _example_database_key(request: pytest.FixtureRequest) -> None:
    """One database key per test and RPC. With a seed, hypothesis keys no database of its own, so
    the failing inputs of a seeded run would not be kept; the node id (which names the RPC) does."""
    if not randomized():
        return
    function = getattr(request.node, "obj", None)
    function = getattr(function, "__func__", function)
    if function is not None and hasattr(function, "hypothesis"):
        function._hypothesis_internal_database_key = request.node.nodeid.encode()
