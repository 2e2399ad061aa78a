"""The main job end to end (``llmops demo --fast``) on a copy of the repository's pipeline, twice.

Invariants, on a fresh stack (seeded: the same data, fine-tune and evaluation every run):

* keep-champion case (the first run asks an improvement no fine-tune reaches): the candidate loses,
  ``champion`` stays on the imported base, whose lineage is itself alone, and serving answers from
  the base on vLLM (full precision);
* promote case (the second run, the shipped rule; DVC re-runs only the promote stage): the
  fine-tune beats the base on the same eval rows, so a variant is promoted; it is the one the rule
  picks from the measured numbers (a quantized child only when it decodes faster than its parent),
  serving answers from it on the engine its format needs, and its lineage runs back (through the
  INT8 quantization job when the child won) to the LoRA training job and the imported base; the
  training link names the dataset path, the data repository commit that holds those bytes (HEAD,
  whose dvc.lock records them) and its MLflow run;
* the quantization job measured perplexity on the pipeline's eval text, not its default text;
* DVC pushed the data to its remote and pulls it back; a repeated deterministic request is answered
  from the cache with the same text;
* two rollouts on the demo's own model through the router and the rollout controller: a healthy
  challenger promotes after every step's window met the SLOs (``champion`` moved to it), and a
  challenger served by the replica with fault injection on (a second of added TTFT, 30% of
  generations failed) rolls back with the breach in its evidence (challenger weight 0, champion
  untouched);
* serving runs as two replicas behind the router: with the challenger on the second replica and alias
  weights champion 90 / challenger 10, 200 requests with distinct session ids split within 7
  percentage points of the weights (the draw is a hash of each session id: binomial standard
  deviation 2.1 points over 200), and each replica answered exactly its version's requests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmops.common.settings import RouterSection
from llmops.stack.demo import DemoResult
from tests.e2e.conftest import DemoRun

#: The session's demo fixture (two runs of the loop, vLLM starts) runs inside whichever test comes
#: first; on a busy 2-core machine it takes well over pytest's default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(2400)]


def _served(result: DemoResult) -> set[tuple[str, str]]:
    return {(row["served"], row["engine"]) for row in result.requests if "served" in row}


def _check_requests(result: DemoResult) -> None:
    first, repeat = result.requests[1], result.requests[2]
    assert not first["cached"] and repeat["cached"] and repeat["text"] == first["text"]
    assert result.requests[0]["text"]  # the streamed answer arrived


def _variant(result: DemoResult, model: str) -> dict[str, Any]:
    evaluation, speed = result.reports["eval"], result.reports["speed"]["variants"]
    [variant] = [v for v in evaluation["variants"] if v["model"] == model]
    return {**variant, **speed[model]}


def test_a_candidate_that_loses_leaves_the_champion_served_with_its_lineage(demo_run: DemoRun) -> None:
    result = demo_run.kept
    promote = result.reports["promote"]
    assert not promote["promoted"], promote["reason"]
    assert promote["champion_before"] == promote["champion_after"] == "assistant:1"
    assert all("does not beat the champion assistant:1" in v for v in promote["verdicts"].values())
    assert [link["version"] for link in result.lineage] == ["assistant:1"]
    base = result.lineage[0]
    assert base["parent"] == "" and base["format"] == "fp32"
    assert _served(result) == {("assistant:1", "vllm")}
    _check_requests(result)


def test_demo_promotes_the_best_variant_and_serves_it_with_its_lineage(demo_run: DemoRun) -> None:
    assert Path(sys.executable).with_name("dvc").exists()
    result, pipeline, head = demo_run.result, demo_run.pipeline, demo_run.head
    promote, evaluation = result.reports["promote"], result.reports["eval"]
    # the second run re-ran only the promote stage: the same numbers as the first
    assert evaluation == demo_run.kept.reports["eval"]
    assert result.reports["speed"] == demo_run.kept.reports["speed"]

    assert promote["promoted"], promote["reason"]
    assert promote["champion_before"] == "assistant:1"
    champion = promote["champion_after"]
    assert result.lineage[0]["version"] == champion
    assert _served(result) == {(champion, promote["engine"])}
    fine_tune, quantized = (_variant(result, v["model"]) for v in evaluation["variants"])
    assert quantized["quantized_from"] == fine_tune["model"] and quantized["format"] == "int8"
    assert fine_tune["engine"] == "vllm" and quantized["engine"] == "transformers"
    assert fine_tune["perplexity"] < evaluation["champion"]["perplexity"]
    # the rule, from the measured numbers: the INT8 child only if it decodes faster than its parent
    child_wins = (
        quantized["decode_tokens_per_second"] > fine_tune["decode_tokens_per_second"]
        and quantized["perplexity"] < evaluation["champion"]["perplexity"]
        and quantized["perplexity"] <= fine_tune["perplexity"] * 1.02
    )
    if child_wins:
        assert champion == quantized["model"] and promote["engine"] == "transformers"
        assert [link["format"] for link in result.lineage] == ["int8", "fp32", "fp32"]
        link, trained, base = result.lineage
        assert link["parent"] == trained["version"] and link["job"].startswith("qj-") and link["mlflow_run"]
    else:
        assert champion == fine_tune["model"] and promote["engine"] == "vllm"
        assert [link["format"] for link in result.lineage] == ["fp32", "fp32"]
        trained, base = result.lineage
    print(f"promoted {champion} on {promote['engine']}: {promote['reason']}")
    assert trained["version"] == fine_tune["model"] and trained["parent"] == base["version"] == "assistant:1"
    assert trained["job"].startswith("tj-") and trained["mlflow_run"]
    assert trained["dataset"] == "data/prepared/sft.jsonl"
    assert trained["dataset_commit"] == head[:12]  # the data repository commit that holds the bytes
    assert base["parent"] == ""

    # the quantization job measured perplexity on the pipeline's eval split
    assert (
        Path(result.reports["quantize"]["eval_text"]).resolve()
        == (pipeline / "data/prepared/eval.txt").resolve()
    )

    _check_requests(result)
    remote = demo_run.root / ".llmops" / "dvc-remote"
    assert any(remote.rglob("*")), "dvc push left the remote empty"
    # What was pushed comes back: drop the prepared data and the local cache, then `dvc pull`.
    sft = pipeline / "data" / "prepared" / "sft.jsonl"
    expected = sft.read_bytes()
    sft.unlink()
    shutil.rmtree(pipeline / ".dvc" / "cache")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "pull", "-q", "build"], cwd=pipeline, check=True, capture_output=True)
    assert sft.read_bytes() == expected


def test_the_router_splits_traffic_between_two_replicas_by_alias_weights(demo_run: DemoRun) -> None:
    result = demo_run.kept
    split = result.split
    champion, challenger = "assistant:1", result.reports["register"]["challenger"]
    assert challenger != champion
    assert split["weights"] == {"champion": 90, "challenger": 10}
    assert split["versions"] == {"champion": champion, "challenger": challenger}
    answered, total = split["per_version"], split["requests"]
    assert total == 200 and sum(answered.values()) == total and set(answered) <= {champion, challenger}
    assert abs(answered.get(challenger, 0) / total - 0.10) <= 0.07, answered
    # both replicas answered, each the requests of the version it serves (none retried elsewhere)
    per_replica = {name: count for name, (_, count) in split["per_replica"].items()}
    assert per_replica == {"serving": answered[champion], "serving-2": answered[challenger]}
    assert per_replica["serving"] > 0 and per_replica["serving-2"] > 0
    # the table the demo printed
    table = split["table"]
    for text in (champion, challenger, "serving-2", f"{answered[challenger]:>8}"):
        assert text in table, table


def test_the_demo_shows_a_promoted_and_a_rolled_back_rollout_with_evidence(demo_run: DemoRun) -> None:
    if "rollout_controller" not in RouterSection.model_fields:
        pytest.skip("this router has no rollout controller (router.rollout_controller)")
    promoted, rolled_back = demo_run.kept.rollouts
    assert promoted["state"] == "promoted", promoted
    judged = [t for t in promoted["transitions"] if t["evidence"] is not None]
    assert len(judged) >= 3 and all(all(t["evidence"]["checks"].values()) for t in judged)  # every step met
    assert all(t["evidence"]["challenger"]["requests"] > 0 for t in judged)
    assert rolled_back["state"] == "rolled_back" and rolled_back["challenger_percent"] == 0, rolled_back
    assert rolled_back["from_version"] == promoted["to_version"]  # the promotion moved champion
    breach = rolled_back["transitions"][-1]["evidence"]
    assert breach is not None and not all(breach["checks"].values())
    # the faulty replica adds a second before every first token it sends
    assert breach["challenger"]["ttft_p95_seconds"] >= 1.0 or breach["challenger"]["ttft_samples"] == 0
