"""Build-only mode of ``llmops serve --check``: the app graph is built, nothing is connected.

A constructor that would otherwise reach a dependency at once (a Ray cluster) reads
:func:`build_only` and defers; start-up outside a check is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_BUILD_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("llmops_build_only", default=False)


def build_only() -> bool:
    """Whether the graph is being built only to be checked (connect nothing)."""
    return _BUILD_ONLY.get()


@contextlib.contextmanager
def building_only() -> Iterator[None]:
    """Build the graph inside this block without connecting to dependencies."""
    token = _BUILD_ONLY.set(True)
    try:
        yield
    finally:
        _BUILD_ONLY.reset(token)
