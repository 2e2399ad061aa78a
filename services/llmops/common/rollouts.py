"""Rollouts as plain types: the spec a person asks for, the record the registry keeps, the windows
of SLIs a controller judges a step on, and the judging itself (:func:`evaluate`).

A rollout moves a model's traffic from its champion (``from_version``) to ``to_version`` in steps of
challenger percent (5, 25, 50, 100). A step is judged once it has lasted ``step_min_seconds`` and
the challenger has answered ``step_min_requests`` in it; every SLO is then checked on the
challenger's window, absolutely (``max_value``) and against the champion's window over the same
span (``max_ratio``, "no worse than"). Comparing against the champion in the same window cancels
what both versions share (the machine's load, the prompt mix), so a ratio bound holds under load
where a fixed bound would cry wolf.

Shared by the registry (validation, record), the controller (judging) and the CLI (display); no
proto types here (:mod:`llmops.common.rollout_client` converts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from llmops.common.errors import InvalidArgument

DEFAULT_STEPS = (5, 25, 50, 100)
DEFAULT_STEP_SECONDS = 60.0
DEFAULT_STEP_REQUESTS = 50
MAX_STEPS = 20
MAX_STEP_SECONDS = 7 * 24 * 3600.0
MAX_STEP_REQUESTS = 1_000_000
#: The SLIs a rollout judges, by the name evidence uses.
SLIS = ("ttft_p95_seconds", "inter_token_p95_seconds", "error_ratio")
CHAMPION = "champion"
CHALLENGER = "challenger"


class RolloutState(StrEnum):
    PENDING = "pending"
    PROGRESSING = "progressing"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"

    @property
    def active(self) -> bool:
        return self in (RolloutState.PENDING, RolloutState.PROGRESSING, RolloutState.PAUSED)


class Decision(StrEnum):
    STEP = "step"
    PROMOTE = "promote"
    ROLL_BACK = "roll_back"
    ABORT = "abort"


@dataclass(frozen=True)
class SloBound:
    """Bounds on one SLI of the challenger; 0 means that bound is not checked."""

    max_value: float = 0.0
    max_ratio: float = 0.0

    @property
    def set(self) -> bool:
        return self.max_value > 0 or self.max_ratio > 0


@dataclass(frozen=True)
class Slos:
    ttft_p95_seconds: SloBound = SloBound()
    inter_token_p95_seconds: SloBound = SloBound()
    error_ratio: SloBound = SloBound()

    def bound(self, sli: str) -> SloBound:
        bound: SloBound = getattr(self, sli)
        return bound


#: TTFT and inter-token p95 no worse than 1.25x the champion's; errors at most 5%, and no more than
#: twice the champion's ratio.
DEFAULT_SLOS = Slos(SloBound(0.0, 1.25), SloBound(0.0, 1.25), SloBound(0.05, 2.0))


@dataclass(frozen=True)
class RolloutSpec:
    model_name: str
    to_version: int
    steps: tuple[int, ...] = ()
    step_min_seconds: float = 0.0
    step_min_requests: int = 0
    slos: Slos | None = None
    reason: str = ""


@dataclass(frozen=True)
class Window:
    """One version's SLIs over a window."""

    version: int
    requests: int = 0
    errors: int = 0
    ttft_p95_seconds: float = 0.0
    inter_token_p95_seconds: float = 0.0
    ttft_samples: int = 0
    inter_token_samples: int = 0
    #: The raw samples behind the p95s when the source has them (the router's windows; not in the
    #: proto): the ratio bounds are then judged by a two-sample test instead of on two p95s.
    ttft_values: tuple[float, ...] = field(default=(), compare=False, repr=False)
    inter_token_values: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def value(self, sli: str) -> float:
        return float(getattr(self, sli))

    def values(self, sli: str) -> tuple[float, ...]:
        if sli == "ttft_p95_seconds":
            return self.ttft_values
        if sli == "inter_token_p95_seconds":
            return self.inter_token_values
        return ()

    def samples(self, sli: str) -> int:
        if sli == "ttft_p95_seconds":
            return self.ttft_samples
        if sli == "inter_token_p95_seconds":
            return self.inter_token_samples
        return self.requests


@dataclass(frozen=True)
class SloCheck:
    sli: str
    champion_value: float
    challenger_value: float
    max_value: float
    max_ratio: float
    met: bool
    detail: str = ""


@dataclass(frozen=True)
class Evidence:
    source: str
    window_seconds: float
    champion: Window
    challenger: Window
    checks: tuple[SloCheck, ...] = ()

    @property
    def met(self) -> bool:
        return all(c.met for c in self.checks)

    def summary(self) -> str:
        """One line: each SLI as challenger vs champion, and requests (for reasons and logs)."""
        parts = [
            f"{c.sli} {c.challenger_value:.4g} vs {c.champion_value:.4g}{'' if c.met else ' BREACH'}"
            for c in self.checks
        ]
        parts.append(f"requests {self.challenger.requests} vs {self.champion.requests}")
        return f"[{self.source} {self.window_seconds:.1f}s] " + ", ".join(parts)


@dataclass(frozen=True)
class Transition:
    from_state: RolloutState
    to_state: RolloutState
    step_index: int
    challenger_percent: int
    at: datetime
    by: str
    reason: str
    evidence: Evidence | None
    revision: int


@dataclass(frozen=True)
class Rollout:
    id: int
    spec: RolloutSpec  # defaults filled in
    from_version: int
    state: RolloutState
    step_index: int
    challenger_percent: int
    revision: int
    step_started_at: datetime
    created_at: datetime
    updated_at: datetime
    created_by: str = ""
    transitions: tuple[Transition, ...] = field(default_factory=tuple)

    @property
    def slos(self) -> Slos:
        return self.spec.slos or DEFAULT_SLOS

    @property
    def on_last_step(self) -> bool:
        return self.state is RolloutState.PROGRESSING and self.step_index == len(self.spec.steps) - 1

    def weights(self, percent: int | None = None) -> dict[str, int]:
        """The alias weights for ``percent`` to the challenger (default: the current one)."""
        share = self.challenger_percent if percent is None else percent
        return {CHAMPION: 100 - share, CHALLENGER: share}


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument("must be a finite number", field=name)
    return value


def check_slos(slos: Slos, field_name: str = "spec.slos") -> Slos:
    """SLOs that can hold: bounds >= 0, ratios 0 or >= 1, error bound <= 1, at least one set."""
    for sli in SLIS:
        bound = slos.bound(sli)
        name = f"{field_name}.{sli}"
        if _finite(bound.max_value, f"{name}.max_value") < 0:
            raise InvalidArgument(
                f"must be >= 0 (0: no bound), got {bound.max_value}", field=f"{name}.max_value"
            )
        ratio = _finite(bound.max_ratio, f"{name}.max_ratio")
        if ratio < 0 or 0 < ratio < 1:
            raise InvalidArgument(
                f"a ratio to the champion means 'no worse than': 0 (no bound) or >= 1, got {ratio}",
                field=f"{name}.max_ratio",
            )
        if sli == "error_ratio" and bound.max_value > 1:
            raise InvalidArgument(
                f"an error ratio is at most 1, got {bound.max_value}", field=f"{name}.max_value"
            )
    if not any(slos.bound(sli).set for sli in SLIS):
        raise InvalidArgument("no SLO bound set: nothing would judge the challenger", field=field_name)
    return slos


def check_spec(spec: RolloutSpec) -> RolloutSpec:
    """``spec`` with defaults filled in, or ``InvalidArgument`` naming the bad field.

    The model and versions are checked against the registry by the caller (they need the store).
    """
    if spec.to_version <= 0:
        raise InvalidArgument("must be a version number >= 1", field="spec.to_version")
    steps = tuple(spec.steps) or DEFAULT_STEPS
    if len(steps) > MAX_STEPS:
        raise InvalidArgument(f"at most {MAX_STEPS} steps", field="spec.steps")
    for i, step in enumerate(steps):
        if not 1 <= step <= 100:
            raise InvalidArgument(f"each step is a percent in [1, 100], got {step}", field=f"spec.steps[{i}]")
        if i and step <= steps[i - 1]:
            raise InvalidArgument(
                f"steps must rise strictly: {steps[i - 1]} then {step}", field=f"spec.steps[{i}]"
            )
    if steps[-1] != 100:
        raise InvalidArgument(f"the last step must be 100, got {steps[-1]}", field="spec.steps")
    seconds = _finite(spec.step_min_seconds, "spec.step_min_seconds") or DEFAULT_STEP_SECONDS
    if not 0 < seconds <= MAX_STEP_SECONDS:
        raise InvalidArgument(
            f"must be in (0, {MAX_STEP_SECONDS:.0f}] seconds, got {spec.step_min_seconds}",
            field="spec.step_min_seconds",
        )
    requests = spec.step_min_requests or DEFAULT_STEP_REQUESTS
    if not 0 < requests <= MAX_STEP_REQUESTS:
        raise InvalidArgument(
            f"must be in [1, {MAX_STEP_REQUESTS}], got {spec.step_min_requests}",
            field="spec.step_min_requests",
        )
    slos = check_slos(spec.slos) if spec.slos is not None else DEFAULT_SLOS
    return replace(spec, steps=steps, step_min_seconds=seconds, step_min_requests=requests, slos=slos)


#: z score above which a latency ratio bound counts as breached (one-sided, about 1 in 4,000 for
#: independent samples; samples of one stream are not independent, hence the margin).
BREACH_Z = 3.5


def exceedance_z(
    champion: tuple[float, ...], challenger: tuple[float, ...], ratio: float
) -> tuple[float, str]:
    """Is the challenger's p95 above ``ratio`` x the champion's, beyond the noise of the window?

    The threshold is ``ratio`` x the champion's p95. If the challenger's p95 were at most that, at
    most 5% of its samples would exceed it, as (about) 5% of the champion's exceed its own p95. The
    two shares are compared with a one-sided two-proportion z test: a p95 read off a few dozen
    samples on a loaded machine swings by 2x between two identical versions, while this test
    needs the challenger's whole tail to sit above the bound.
    """
    p95 = quantile(list(champion), 0.95)
    threshold = ratio * p95
    k = sum(v > threshold for v in challenger)
    m = sum(v > p95 for v in champion)
    n_x, n_c = len(challenger), len(champion)
    pooled = (k + m) / (n_x + n_c)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_x + 1 / n_c)) if 0 < pooled < 1 else 0.0
    z = (k / n_x - m / n_c) / spread if spread else 0.0
    return (
        z,
        f"{k}/{n_x} challenger samples above {ratio:.3g}x the champion's p95 vs {m}/{n_c} of the champion's (z={z:.1f})",
    )


def evaluate(slos: Slos, champion: Window, challenger: Window) -> tuple[SloCheck, ...]:
    """Each SLO judged on the challenger's window against its bounds and the champion's window.

    A latency SLI without samples on the challenger is not judged (met, with a note): the error
    ratio still catches a challenger whose streams all fail. Without champion samples in the window
    (the 100% step) ratio bounds are not judged. When both windows carry their raw samples a
    latency ratio bound is judged by :func:`exceedance_z` (breach above :data:`BREACH_Z`), else on
    the two p95s. The error ratio's ratio bound allows one error of slack (``errors <= 1`` passes
    it), so one transient failure against a champion with none does not roll back a rollout; its
    absolute bound still applies.
    """
    checks = []
    for sli in SLIS:
        bound = slos.bound(sli)
        if not bound.set:
            continue
        mine, theirs = challenger.value(sli), champion.value(sli)
        problems = []
        notes = []
        if challenger.samples(sli) == 0:
            checks.append(SloCheck(sli, theirs, mine, bound.max_value, bound.max_ratio, True, "no samples"))
            continue
        if bound.max_value > 0 and mine > bound.max_value:
            problems.append(f"{sli} {mine:.4g} above {bound.max_value:.4g}")
        if bound.max_ratio > 0 and champion.samples(sli) == 0:
            notes.append("no champion samples in the window: ratio not judged")
        elif bound.max_ratio > 0:
            limit = bound.max_ratio * theirs
            ratio = mine / theirs if theirs > 0 else math.inf
            said = f"{sli} {mine:.4g} is {ratio:.3g}x the champion's {theirs:.4g} (at most {bound.max_ratio:.3g}x)"
            if champion.values(sli) and challenger.values(sli):
                z, test = exceedance_z(champion.values(sli), challenger.values(sli), bound.max_ratio)
                (problems if z > BREACH_Z else notes).append(f"{said}: {test}" if z > BREACH_Z else test)
            elif mine > limit and not (sli == "error_ratio" and challenger.errors <= 1):
                problems.append(said)
        checks.append(
            SloCheck(
                sli,
                theirs,
                mine,
                bound.max_value,
                bound.max_ratio,
                not problems,
                "; ".join(problems or notes),
            )
        )
    return tuple(checks)


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of ``values`` (0.0 when empty); ``values`` need not be sorted."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]
