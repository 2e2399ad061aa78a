"""The rollout controller's decisions (llmops.router.rollout), against fakes of the registry and SLIs.

Invariants: a paused rollout is left alone; a champion moved by someone else aborts the rollout
(never a STEP or PROMOTE); a pending rollout takes its first step; a step is judged only after its
minimum duration and challenger requests; a breach rolls back with the evidence, met SLOs step on,
and on the last step promote; a STEP refused because the champion moved meanwhile turns into ABORT.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from llmops.common.clients import TrafficSplit
from llmops.common.errors import FailedPrecondition
from llmops.common.rollouts import (
    Decision,
    Evidence,
    Rollout,
    RolloutSpec,
    RolloutState,
    SloBound,
    Slos,
    Window,
    check_spec,
)
from llmops.router.rollout import RolloutController, SliSource

NOW = datetime.now(UTC)
SPEC = check_spec(
    RolloutSpec("m", 2, steps=(50, 100), step_min_seconds=10, step_min_requests=20,
                slos=Slos(ttft_p95_seconds=SloBound(max_value=0.5)))
)  # fmt: skip


def rollout(state: RolloutState, step: int = 0, started_ago: float = 60.0) -> Rollout:
    return Rollout(1, SPEC, 1, state, step, SPEC.steps[step] if state is RolloutState.PROGRESSING else 0, 5,
                   NOW - timedelta(seconds=started_ago), NOW, NOW)  # fmt: skip


class FakeRollouts:
    def __init__(self, refuse: str = "") -> None:
        self.calls: list[tuple[Decision, str, Evidence | None]] = []
        self.refuse = refuse
        self.current: Rollout | None = None

    async def advance(self, rollout_id: int, *, expected_revision: int, decision: Decision, reason: str,
                      evidence: Evidence | None = None) -> Rollout:  # fmt: skip
        if self.refuse and decision is not Decision.ABORT:
            raise FailedPrecondition(self.refuse)
        self.calls.append((decision, reason, evidence))
        assert self.current is not None
        return replace(self.current, revision=expected_revision + 1)

    async def get(self, rollout_id: int) -> Rollout:
        assert self.current is not None
        return self.current


class FakeRegistry:
    def __init__(self, champion: int) -> None:
        self.champion = champion

    async def get_alias_weights(self, model_name: str) -> TrafficSplit:
        return TrafficSplit(
            model_name, 3, {"champion": 50, "challenger": 50}, {"champion": self.champion, "challenger": 2}
        )


class FakeSource(SliSource):
    name = "fake"

    def __init__(self, challenger: Window) -> None:
        self.challenger = challenger

    async def windows(
        self, model_name: str, versions: tuple[int, int], seconds: float
    ) -> tuple[Window, Window]:
        return Window(1, requests=100, ttft_p95_seconds=0.1, ttft_samples=100), self.challenger


GOOD = Window(2, requests=30, ttft_p95_seconds=0.2, ttft_samples=30)
SLOW = Window(2, requests=30, ttft_p95_seconds=0.9, ttft_samples=30)


def controller(
    challenger: Window = GOOD, champion: int = 1, refuse: str = ""
) -> tuple[RolloutController, FakeRollouts]:
    fake = FakeRollouts(refuse)
    made = RolloutController(fake, FakeRegistry(champion), FakeSource(challenger), clock=lambda: NOW)  # type: ignore[arg-type]
    return made, fake


@pytest.mark.parametrize(
    ("current", "challenger", "champion", "expected"),
    [
        (rollout(RolloutState.PAUSED), GOOD, 1, None),
        (rollout(RolloutState.PROGRESSING), GOOD, 3, Decision.ABORT),  # champion moved by hand
        (rollout(RolloutState.PAUSED), GOOD, 3, None),  # a paused one waits for its person
        (rollout(RolloutState.PENDING), GOOD, 1, Decision.STEP),
        (rollout(RolloutState.PROGRESSING, started_ago=2), GOOD, 1, None),  # too early
        (rollout(RolloutState.PROGRESSING), replace(GOOD, requests=5), 1, None),  # too few requests
        (rollout(RolloutState.PROGRESSING), SLOW, 1, Decision.ROLL_BACK),
        (rollout(RolloutState.PROGRESSING), GOOD, 1, Decision.STEP),
        (rollout(RolloutState.PROGRESSING, step=1), GOOD, 1, Decision.PROMOTE),
        (rollout(RolloutState.PROGRESSING, step=1), SLOW, 1, Decision.ROLL_BACK),
    ],
)
async def test_decisions(
    current: Rollout, challenger: Window, champion: int, expected: Decision | None
) -> None:
    made, fake = controller(challenger, champion)
    fake.current = current
    result = await made.decide(current)
    assert [c[0] for c in fake.calls] == ([expected] if expected else [])
    assert (result is None) == (expected is None)
    if expected is Decision.ROLL_BACK:
        reason, evidence = fake.calls[0][1], fake.calls[0][2]
        assert "ttft_p95_seconds 0.9 above 0.5" in reason
        assert evidence is not None and evidence.challenger == SLOW and not evidence.met


async def test_step_refused_because_champion_moved_aborts() -> None:
    made, fake = controller(refuse="champion of 'm' points at version 3, not 1 ...: someone moved it; abort")
    fake.current = rollout(RolloutState.PROGRESSING)
    await made.decide(fake.current)
    assert [c[0] for c in fake.calls] == [Decision.ABORT]
    assert "no alias moved" in fake.calls[0][1]


async def test_other_refusals_are_not_turned_into_aborts() -> None:
    made, fake = controller(refuse="rollout 1 is on its last step")
    fake.current = rollout(RolloutState.PROGRESSING)
    with pytest.raises(FailedPrecondition):
        await made.decide(fake.current)
    assert fake.calls == []
