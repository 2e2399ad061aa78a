"""What every benchmark shares: alternating rounds, medians and percentiles, and the RESULT gate.

A benchmark measures its baseline in the same run, in rounds whose order alternates
(:func:`alternating`), reports medians, and ends with :func:`finish`: one line per goal,

    RESULT <name> <value> goal <op> <bound> met|MISSED

printed last (the last line of the output is always a RESULT line), and an exit code that is
non-zero when any goal is missed. ``make bench`` (``benchmarks/run.py``) collects those lines.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

T = TypeVar("T")
Op = Literal[">=", "<="]
#: ``make bench`` sets this so every benchmark runs its quick workload (``--quick`` does the same).
QUICK_ENV = "LLMOPS_BENCH_QUICK"
MIN_ROUNDS = 3


def quick_default() -> bool:
    """Whether ``make bench`` asked for the quick workload."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0", "false")


def alternating(items: Sequence[T], rounds: int) -> Iterator[list[T]]:
    """``rounds`` orders of ``items``: round r starts at item r (a rotation), so every item is
    measured first, last and in between alike and background load hits all of them evenly."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"at least {MIN_ROUNDS} rounds are needed for a median, not {rounds}")
    for r in range(rounds):
        shift = r % len(items) if items else 0
        yield [*items[shift:], *items[:shift]]


def median(values: Iterable[float]) -> float:
    found = list(values)
    return statistics.median(found) if found else math.nan


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0..100); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class Goal:
    """``value op bound``: a measured number and the bound a user would care about."""

    name: str
    value: float
    op: Op
    bound: float

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.bound if self.op == ">=" else self.value <= self.bound

    def line(self) -> str:
        return f"RESULT {self.name} {self.value:.3f} goal {self.op} {self.bound:g} {'met' if self.met else 'MISSED'}"


def finish(*goals: Goal) -> int:
    """Print every goal's RESULT line last; the exit code: 0 when all are met, else 1."""
    if not goals:
        raise ValueError("a benchmark needs at least one goal")
    sys.stdout.flush()
    sys.stderr.flush()
    for goal in goals:
        print(goal.line(), flush=True)
    return 0 if all(goal.met for goal in goals) else 1
