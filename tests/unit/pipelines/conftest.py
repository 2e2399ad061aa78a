"""A small fake standard library, so ingest tests read known source instead of the real one."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

MODULE = '''\
"""A module for tests."""

import functools


def add(a, b=1):
    """Return a plus b.

    More text that is not the summary.
    """
    # a comment that belongs to the first statement
    total = a + b

    return total


@functools.cache
def cached(x: int) -> int:
    """Compute x squared. Cached."""
    if x < 0:
        raise ValueError("negative")
    return x * x


def undocumented(x):
    return x


def one_liner(x): "Doc on the def line."; return x


def shares_a_line(x):
    """Statements share a line."""
    y = x; return y


def only_docstring():
    """Nothing after the docstring."""


async def fetch(url):
    """Fetch the url! It is async."""
    data = await get(url)
    return data


class Box:
    """A box."""

    def put(self, item):
        """Put an item in the box."""
        self.items.append(item)
        self.count += 1
        return self.count

    def stub(self):
        """A method that does nothing yet."""
        pass
'''


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    """A folder with ``pkg/__init__.py`` (:data:`MODULE`), a file that does not parse, and tests
    in ``test/`` that ingest must skip."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text(MODULE)
    (root / "broken.py").write_text("def broken(:\n")
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text(
        textwrap.dedent('''\
        def test_thing():
            """A test that ingest never reads."""
            assert True
        ''')
    )
    return root
