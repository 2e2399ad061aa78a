"""``promote.decide`` promotes only a variant that beats the champion, and of those the one that serves
fastest; it never compares a number that is not finite.

Invariants: a full-precision candidate with a lower eval perplexity than the champion wins, one with
a higher or equal perplexity (a tie) does not, nor one short of ``min_improvement``; with no
champion the best variant wins; a NaN or infinite perplexity or speed (a variant's or the
champion's) is refused with a reason that names it, never promoted; a quantized child wins over its
parent only when it decodes faster on its serving engine and costs at most
``max_quantization_increase`` perplexity; a slower child loses to its parent even when it is
better in quality; the reason names the chosen version, its engine and the numbers.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from pipelines.stages.promote import decide

LIMIT = 0.02


def reports(
    *,
    champion: float | None = 20.0,
    fp: float = 18.0,
    int8: float | None = 18.1,
    fp_speed: float = 100.0,
    int8_speed: float = 150.0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """eval.json and speed.json for a champion, the fine-tune ``m:2`` (vLLM) and its INT8 ``m:3``."""
    evaluation: dict[str, Any] = {
        "variants": [{"model": "m:2", "format": "fp32", "perplexity": fp, "quantized_from": ""}]
    }
    speed: dict[str, Any] = {"variants": {"m:2": {"engine": "vllm", "decode_tokens_per_second": fp_speed}}}
    if int8 is not None:
        evaluation["variants"].append(
            {"model": "m:3", "format": "int8", "perplexity": int8, "quantized_from": "m:2"}
        )
        speed["variants"]["m:3"] = {"engine": "transformers", "decode_tokens_per_second": int8_speed}
    if champion is not None:
        evaluation["champion"] = {"model": "m:1", "perplexity": champion, "engine": "vllm"}
    return evaluation, speed


def test_a_faster_quantized_child_within_the_allowance_wins() -> None:
    decision = decide(*reports(), max_quantization_increase=LIMIT)
    assert decision.promoted and decision.version == "m:3" and decision.engine == "transformers"
    assert "m:3 on transformers" in decision.reason and "1.50x m:2's 100.0 on vllm" in decision.reason
    assert "18.100 < champion m:1's 20.000" in decision.reason
    assert decision.verdicts["m:2"].startswith("qualifies")


def test_a_slower_quantized_child_loses_to_its_parent() -> None:
    # the flagship case: INT8 on transformers at 0.67x the parent's speed
    decision = decide(*reports(fp_speed=14.6, int8_speed=9.8), max_quantization_increase=LIMIT)
    assert decision.promoted and decision.version == "m:2" and decision.engine == "vllm"
    assert "decodes at 0.67x its parent's speed" in decision.verdicts["m:3"]
    assert "not chosen: m:3" in decision.reason


def test_a_slower_child_does_not_win_even_when_its_perplexity_is_lower() -> None:
    decision = decide(
        *reports(fp=18.0, int8=17.9, fp_speed=100.0, int8_speed=99.0), max_quantization_increase=LIMIT
    )
    assert decision.version == "m:2"


def test_an_equally_fast_child_does_not_win() -> None:
    decision = decide(*reports(fp_speed=100.0, int8_speed=100.0), max_quantization_increase=LIMIT)
    assert decision.version == "m:2" and "1.00x" in decision.verdicts["m:3"]


def test_a_faster_child_that_costs_too_much_quality_loses() -> None:
    decision = decide(*reports(fp=18.0, int8=18.0 * 1.05), max_quantization_increase=LIMIT)
    assert decision.version == "m:2"
    assert "raised eval perplexity by 5.00% over m:2 (limit 2.00%)" in decision.verdicts["m:3"]


def test_win_full_precision_alone() -> None:
    decision = decide(*reports(int8=None), max_quantization_increase=LIMIT)
    assert decision.promoted and decision.version == "m:2" and decision.engine == "vllm"


def test_loss_keeps_the_champion() -> None:
    decision = decide(*reports(champion=17.0), max_quantization_increase=LIMIT)
    assert not decision.promoted and decision.version == "" and decision.engine == ""
    assert "does not beat the champion m:1's 17.000" in decision.verdicts["m:2"]
    assert decision.reason.startswith("no variant qualifies")


def test_a_tie_keeps_the_champion() -> None:
    decision = decide(*reports(champion=18.0, int8=18.2), max_quantization_increase=LIMIT)
    assert not decision.promoted
    assert "18.000 does not beat the champion m:1's 18.000" in decision.verdicts["m:2"]


def test_min_improvement_makes_a_small_win_a_loss() -> None:
    evaluation, speed = reports(champion=20.0, fp=19.0, int8=19.1)
    assert decide(evaluation, speed, max_quantization_increase=LIMIT).promoted
    decision = decide(evaluation, speed, max_quantization_increase=LIMIT, min_improvement=0.1)
    assert not decision.promoted and "by 10.0%" in decision.verdicts["m:2"]


def test_no_champion_promotes_the_best_variant() -> None:
    decision = decide(*reports(champion=None), max_quantization_increase=LIMIT)
    assert decision.promoted and decision.version == "m:3" and "no champion yet" in decision.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_candidate_perplexity_that_is_not_finite_is_refused(bad: float) -> None:
    decision = decide(*reports(fp=bad, int8=None), max_quantization_increase=LIMIT)
    assert not decision.promoted
    assert f"eval perplexity is {bad}: refused (not finite)" in decision.verdicts["m:2"]
    assert "m:2" in decision.reason and str(bad) in decision.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_champion_perplexity_that_is_not_finite_refuses_the_decision(bad: float) -> None:
    decision = decide(*reports(champion=bad), max_quantization_increase=LIMIT)
    assert not decision.promoted
    assert (
        f"champion m:1's eval perplexity is {bad}" in decision.reason
        and "not a finite number" in decision.reason
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_child_that_is_not_finite_is_refused_and_the_parent_still_wins(bad: float) -> None:
    decision = decide(*reports(int8=bad), max_quantization_increase=LIMIT)
    assert decision.version == "m:2" and "refused (not finite)" in decision.verdicts["m:3"]
    decision = decide(*reports(int8_speed=bad), max_quantization_increase=LIMIT)
    assert (
        decision.version == "m:2" and f"decode tokens/s on transformers is {bad}" in decision.verdicts["m:3"]
    )


def test_a_parent_that_is_not_finite_disqualifies_its_child() -> None:
    decision = decide(*reports(fp=math.nan), max_quantization_increase=LIMIT)
    assert not decision.promoted
    assert "its parent m:2's numbers are not finite" in decision.verdicts["m:3"]


def test_an_unmeasured_speed_is_refused() -> None:
    evaluation, speed = reports(int8=None)
    del speed["variants"]["m:2"]
    decision = decide(evaluation, speed, max_quantization_increase=LIMIT)
    assert not decision.promoted and "decode tokens/s on ? is missing" in decision.verdicts["m:2"]
