"""The demo's rollout follower prints every transition with its evidence and ends with the final state.

Invariants (on a fake rollout API that moves like the controller would): the demo asks for short
steps (a few seconds, a few requests) with its SLOs; it sends traffic only while the rollout is
active; each transition is printed once, in order, with both versions' TTFT p95, ITL p95 and error
ratio against the bounds and which SLO was breached; a rollout still active at the timeout is
aborted and said so; the returned record holds the final state and each transition's evidence.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from llmops.common.rollouts import (
    Evidence,
    Rollout,
    RolloutSpec,
    RolloutState,
    Transition,
    Window,
    evaluate,
)
from llmops.stack.rollout_demo import DEMO_SLOS, DEMO_STEPS, RolloutCase, follow, transition_text

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def evidence(challenger_ttft: float, errors: int = 0) -> Evidence:
    champion = Window(1, requests=40, ttft_p95_seconds=0.05, inter_token_p95_seconds=0.01, ttft_samples=40,
                      inter_token_samples=120)  # fmt: skip
    challenger = Window(2, requests=20, errors=errors, ttft_p95_seconds=challenger_ttft,
                        inter_token_p95_seconds=0.011, ttft_samples=20, inter_token_samples=60)  # fmt: skip
    return Evidence("router", 3.2, champion, challenger, evaluate(DEMO_SLOS, champion, challenger))


class FakeRollouts:
    """Moves one step per ``get``, judging each window with the real SLO checks."""

    def __init__(self, windows: list[Evidence], *, stall: bool = False) -> None:
        self.windows = windows
        self.stall = stall
        self.spec: RolloutSpec | None = None
        self.rollout: Rollout | None = None
        self.aborted = ""

    def _move(self, to: RolloutState, percent: int, reason: str, found: Evidence | None) -> None:
        assert self.rollout is not None
        r = self.rollout
        t = Transition(r.state, to, 0, percent, NOW, "controller", reason, found, r.revision + 1)
        self.rollout = dataclasses.replace(
            r, state=to, challenger_percent=percent, revision=r.revision + 1, transitions=(*r.transitions, t)
        )

    async def start(self, spec: RolloutSpec, *, timeout: float | None = None) -> Rollout:
        self.spec = spec
        self.rollout = Rollout(7, spec, 1, RolloutState.PENDING, 0, 0, 1, NOW, NOW, NOW)
        return self.rollout

    async def get(
        self, rollout_id: int = 0, *, model_name: str = "", timeout: float | None = None
    ) -> Rollout:
        assert self.rollout is not None and rollout_id == 7
        if self.stall:
            return self.rollout
        step = len([t for t in self.rollout.transitions if t.evidence is not None])
        if self.rollout.state is RolloutState.PENDING:
            self._move(RolloutState.PROGRESSING, DEMO_STEPS[0], "start", None)
        elif not self.windows[step].met:
            self._move(RolloutState.ROLLED_BACK, 0, "SLO breached", self.windows[step])
        elif step + 1 < len(DEMO_STEPS):
            self._move(RolloutState.PROGRESSING, DEMO_STEPS[step + 1], "step met", self.windows[step])
        else:
            self._move(RolloutState.PROMOTED, 100, "promoted", self.windows[step])
        return self.rollout

    async def abort(self, rollout_id: int, *, reason: str = "", timeout: float | None = None) -> Rollout:
        self.aborted = reason
        self._move(RolloutState.ABORTED, 0, reason, None)
        assert self.rollout is not None
        return self.rollout


class Traffic:
    def __init__(self, fake: FakeRollouts) -> None:
        self.fake = fake
        self.bursts = 0

    async def __call__(self, seconds: float) -> int:
        assert self.fake.rollout is not None and self.fake.rollout.state.active  # only while active
        self.bursts += 1
        return 10


async def test_a_healthy_challenger_promotes_and_every_step_is_printed() -> None:
    fake = FakeRollouts([evidence(0.055), evidence(0.06), evidence(0.05)])
    said: list[str] = []
    result = await follow(
        fake, RolloutCase("promote", "m", 2, RolloutState.PROMOTED), Traffic(fake), said.append
    )
    assert fake.spec is not None and fake.spec.steps == DEMO_STEPS and fake.spec.step_min_seconds <= 5
    assert result["state"] == "promoted" and result["expected"] == "promoted" and result["requests"] == 40
    assert [t["to_state"] for t in result["transitions"]] == ["progressing"] * 3 + ["promoted"]
    text = "\n".join(said)
    assert text.count("champion v1") == 3 and "55 ms" in text and "BREACH" not in text
    assert "ended PROMOTED" in said[-1]


async def test_a_slow_challenger_rolls_back_on_the_first_window_naming_the_breach() -> None:
    fake = FakeRollouts([evidence(0.4, errors=3)])
    said: list[str] = []
    result = await follow(
        fake, RolloutCase("roll back", "m", 2, RolloutState.ROLLED_BACK), Traffic(fake), said.append
    )
    assert result["state"] == "rolled_back" and result["challenger_percent"] == 0
    last = result["transitions"][-1]["evidence"]
    assert last["challenger"]["ttft_p95_seconds"] == 0.4 and last["champion"]["ttft_p95_seconds"] == 0.05
    assert last["checks"] == {
        "ttft_p95_seconds": False,
        "inter_token_p95_seconds": True,
        "error_ratio": False,
    }
    text = "\n".join(said)
    assert "400 ms" in text and "15.0%" in text and text.count("BREACH") == 2
    assert "ended ROLLED_BACK" in said[-1]


async def test_a_rollout_nobody_moves_is_aborted_at_the_timeout() -> None:
    fake = FakeRollouts([], stall=True)
    said: list[str] = []
    result = await follow(
        fake, RolloutCase("stuck", "m", 2, RolloutState.PROMOTED), Traffic(fake), said.append,
        timeout=0.05, burst_seconds=0.01,
    )  # fmt: skip
    assert result["state"] == "aborted" and fake.aborted.startswith("demo: still pending")
    assert any("rollout controller running" in line for line in said)


def test_a_transition_without_evidence_is_one_line() -> None:
    t = Transition(RolloutState.PENDING, RolloutState.PROGRESSING, 0, 20, NOW, "c", "first step", None, 2)
    assert transition_text(t, DEMO_SLOS) == "  pending -> progressing (challenger 20%): first step"
