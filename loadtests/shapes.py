"""Load shapes as pure functions of the time since the run started (Locust's shape class calls them).

Every shape is sized by Locust's own options: ``-u`` is the peak number of users, ``-r`` the least
spawn rate, ``-t`` the run's length (60 s when a non-constant shape has none). A shape raises the
spawn rate where its change needs it (a spike lands within a second; a ramp keeps up with its slope),
because Locust's shape loop waits for each change to finish before it asks again.

* ``constant``: ``-u`` users for ``-t`` (without ``-t``: until stopped) — plain Locust.
* ``ramp``: from 1 user up to ``-u`` linearly over ``ramp_up`` seconds (default half the run), then hold.
* ``step``: ``steps`` equal steps up to ``-u``, each lasting ``-t / steps``.
* ``spike``: ``base_fraction`` of ``-u`` (at least 1), with ``-u`` users from ``spike_start`` for
  ``spike_length`` (fractions of the run), then back to the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SHAPES = ("constant", "ramp", "step", "spike")
#: Length of a ramp, step or spike run given no ``-t``.
DEFAULT_SHAPED_SECONDS = 60.0

Tick = tuple[int, float]


@dataclass(frozen=True)
class LoadProfile:
    """Users and spawn rate over time; :meth:`at` is what a Locust shape's ``tick`` returns."""

    kind: str = "constant"
    users: int = 1
    spawn_rate: float = 1.0
    #: Seconds the run lasts; ``None`` only for ``constant`` (run until stopped).
    duration: float | None = None
    #: ``ramp``: seconds to reach ``users``; ``None`` means half the run.
    ramp_up: float | None = None
    #: ``step``: number of steps.
    steps: int = 4
    #: ``spike``: when the spike starts and how long it lasts, as fractions of the run.
    spike_start: float = 0.4
    spike_length: float = 0.2
    #: ``spike``: users outside the spike, as a fraction of ``users``.
    base_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in SHAPES:
            raise ValueError(f"unknown shape {self.kind!r}; one of {', '.join(SHAPES)}")
        if self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if self.spawn_rate <= 0:
            raise ValueError(f"spawn rate must be > 0, got {self.spawn_rate}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration}")
        if self.duration is None and self.kind != "constant":
            raise ValueError(f"a {self.kind} shape needs a duration")
        if self.ramp_up is not None and self.ramp_up <= 0:
            raise ValueError(f"ramp-up must be > 0 s, got {self.ramp_up}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (0 <= self.spike_start < 1 and 0 < self.spike_length <= 1 - self.spike_start):
            raise ValueError("the spike must start in [0, 1) and end by the end of the run (fractions)")
        if not 0 < self.base_fraction <= 1:
            raise ValueError(f"base fraction must be in (0, 1], got {self.base_fraction}")

    def at(self, seconds: float) -> Tick | None:
        """``(users, spawn_rate)`` wanted ``seconds`` after the start; ``None`` once the run is over."""
        if self.duration is not None and seconds >= self.duration:
            return None
        if self.kind == "constant":
            return self.users, self.spawn_rate
        assert self.duration is not None
        if self.kind == "ramp":
            ramp_up = self.ramp_up if self.ramp_up is not None else self.duration / 2
            users = self.users if seconds >= ramp_up else max(1, math.ceil(self.users * seconds / ramp_up))
            return users, max(self.spawn_rate, self.users / ramp_up)
        if self.kind == "step":
            step = min(self.steps - 1, int(seconds // (self.duration / self.steps)))
            users = math.ceil(self.users * (step + 1) / self.steps)
            return users, max(self.spawn_rate, self.users / self.steps)
        base = max(1, round(self.users * self.base_fraction))
        start = self.spike_start * self.duration
        spiking = start <= seconds < start + self.spike_length * self.duration
        return (self.users if spiking else base), max(self.spawn_rate, float(self.users - base))


def profile_from_options(options: Any) -> LoadProfile:
    """The profile Locust's parsed options ask for (``--shape`` and friends, ``-u``, ``-r``, ``-t``)."""
    kind = getattr(options, "shape", None) or "constant"
    duration = getattr(options, "run_time", None) or None
    if duration is None and kind != "constant":
        duration = DEFAULT_SHAPED_SECONDS
    return LoadProfile(
        kind=kind,
        users=int(getattr(options, "num_users", None) or 1),
        spawn_rate=float(getattr(options, "spawn_rate", None) or 1.0),
        duration=float(duration) if duration is not None else None,
        ramp_up=getattr(options, "ramp_up", None) or None,
        steps=int(getattr(options, "steps", None) or 4),
        spike_start=float(getattr(options, "spike_start", 0.4)),
        spike_length=float(getattr(options, "spike_length", 0.2)),
        base_fraction=float(getattr(options, "spike_base", 0.25)),
    )
