"""The promote stage runs its gates in order and stops at the first that fails.

Invariants (the services faked at the stage's seams): evaluation, then the load gate on the chosen
variant alone, then the move; a failed load gate leaves the champion where it was and the report
says why, with every gate's verdict; a passed one moves the champion with compare-and-set on the
champion seen at evaluation, or, with ``promote.rollout.enabled``, starts a rollout instead (the
champion does not move yet); a candidate that loses evaluation runs no other gate; every verdict
is recorded (MLflow run, alias history) whenever a candidate got past evaluation.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pipelines.stages import promote
from pipelines.stages.gates import GateVerdict

EVAL = {
    "champion": {"model": "m:1", "perplexity": 20.0, "engine": "vllm"},
    "variants": [{"model": "m:2", "perplexity": 10.0, "quantized_from": ""}],
}
SPEED = {"variants": {"m:2": {"engine": "vllm", "decode_tokens_per_second": 50.0}}, "engine_options": {}}


class Seams:
    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        *,
        load_passes: bool,
        rollout: bool,
        min_improvement: float = 0.0,
    ) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.report: dict[str, Any] = {}
        params = {"max_quantization_increase": 0.02, "min_improvement": min_improvement,
                  "load_gate": {"enabled": True, "seconds": 1}, "rollout": {"enabled": rollout}}  # fmt: skip
        monkeypatch.setattr(promote, "load_params", lambda _path: {"promote": params})
        monkeypatch.setattr(promote, "read_json", lambda path: EVAL if path.name == "eval.json" else SPEED)
        monkeypatch.setattr(
            promote, "settings", lambda: SimpleNamespace(serving=SimpleNamespace(address="serving:1"))
        )

        def load_gate(serving: str, model: str, engine: str, options: Any, gate: Any) -> GateVerdict:
            self.calls.append(("load_gate", (serving, model, engine)))
            return GateVerdict(
                "load", load_passes, "ok" if load_passes else "breached: error ratio 0.2 (<= 0.01)"
            )

        monkeypatch.setattr(promote, "load_gate", load_gate)
        monkeypatch.setattr(promote, "_move_champion", lambda *args: self.calls.append(("move", args)))
        monkeypatch.setattr(promote, "_start_rollout",
                            lambda *args: self.calls.append(("rollout", args)) or GateVerdict("rollout", True, "started", {"id": 9}))  # fmt: skip
        monkeypatch.setattr(
            promote,
            "_record",
            lambda model, gates: self.calls.append(("record", [g.gate for g in gates])) or [],
        )
        monkeypatch.setattr(promote, "report", lambda name, data: self.report.update(data))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def test_a_passed_load_gate_moves_the_champion_with_compare_and_set(monkeypatch: pytest.MonkeyPatch) -> None:
    seams = Seams(monkeypatch, load_passes=True, rollout=False)
    assert promote.main([]) == 0
    assert seams.names() == ["load_gate", "move", "record"]
    assert seams.calls[0][1] == ("serving:1", "m:2", "vllm")
    name, version, previous, _ = seams.calls[1][1]
    assert (name, version, previous) == ("m", 2, "m:1")
    assert seams.report["promoted"] and seams.report["champion_after"] == "m:2"
    assert [g["gate"] for g in seams.report["gates"]] == ["evaluation", "load", "rollout"]


def test_a_failed_load_gate_stops_the_promotion_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    seams = Seams(monkeypatch, load_passes=False, rollout=True)
    promote.main([])
    assert seams.names() == ["load_gate", "record"]  # no move, no rollout; the verdicts still recorded
    assert not seams.report["promoted"] and seams.report["champion_after"] == "m:1"
    assert seams.report["reason"] == "stopped at the load gate: breached: error ratio 0.2 (<= 0.01)"
    assert [(g["gate"], g["passed"]) for g in seams.report["gates"]] == [
        ("evaluation", True),
        ("load", False),
    ]


def test_with_rollouts_the_stage_starts_one_and_leaves_the_champion(monkeypatch: pytest.MonkeyPatch) -> None:
    seams = Seams(monkeypatch, load_passes=True, rollout=True)
    promote.main([])
    assert seams.names() == ["load_gate", "rollout", "record"]
    assert seams.report["rollout"] == 9 and not seams.report["promoted"]
    assert seams.report["champion_after"] == "m:1"


def test_a_candidate_that_loses_evaluation_runs_no_other_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    seams = Seams(monkeypatch, load_passes=True, rollout=False, min_improvement=0.9)
    promote.main([])
    assert seams.calls == []
    assert [g["gate"] for g in seams.report["gates"]] == ["evaluation"] and not seams.report["promoted"]
