"""Build writes the SFT, DPO and eval sets and the eval and calibration text the services take.

Invariants: every JSON-lines file passes the training service's own ``validate_rows`` (inferred as
prompt_completion for SFT and eval, preference for DPO); rows hold only their format's fields; the
prompt template wraps every prompt; the eval text (the quantization job's perplexity) holds the eval
rows and nothing else; a set that would be empty or refused fails the stage instead of
the training job; the four stages run in process end to end on the files they hand each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmops.training.data import FORMAT_FIELDS, validate_rows
from pipelines.stages import build, clean, ingest, split
from pipelines.stages.common import SPLITS, load_params, read_jsonl

PIPELINES = Path(__file__).resolve().parents[3] / "pipelines"
TEMPLATE = "Q: {prompt}\nA: "


def _splits(count: int = 3) -> dict[str, dict[str, list[dict[str, Any]]]]:
    def instructions(name: str) -> list[dict[str, Any]]:
        return [
            {"id": f"{name}{i}", "prompt": f"{name} {i}", "completion": f"return {i}"} for i in range(count)
        ]

    def preferences(name: str) -> list[dict[str, Any]]:
        return [
            {
                "id": f"{name}{i}",
                "prompt": f"{name} {i}",
                "chosen": f"return {i}",
                "rejected": "pass",
                "corruption": "pass",
            }
            for i in range(count)
        ]

    return {name: {"instructions": instructions(name), "preferences": preferences(name)} for name in SPLITS}


def test_the_sets_validate_with_the_training_service() -> None:
    contents = build.build(_splits(), TEMPLATE)
    assert sorted(contents) == ["calibration.txt", "dpo.jsonl", "eval.jsonl", "eval.txt", "sft.jsonl"]
    assert validate_rows(contents["sft.jsonl"].encode(), None, "sft") == ("prompt_completion", 3)
    assert validate_rows(contents["sft.jsonl"].encode(), None, "lora") == ("prompt_completion", 3)
    assert validate_rows(contents["eval.jsonl"].encode(), None, "sft") == ("prompt_completion", 3)
    assert validate_rows(contents["dpo.jsonl"].encode(), None, "dpo") == ("preference", 3)


def test_rows_hold_only_their_formats_fields_with_the_template_applied() -> None:
    contents = build.build(_splits(), TEMPLATE)
    sft = [json.loads(line) for line in contents["sft.jsonl"].splitlines()]
    dpo = [json.loads(line) for line in contents["dpo.jsonl"].splitlines()]
    assert sft[0] == {"prompt": "Q: train 0\nA: ", "completion": "return 0"}
    assert all(tuple(row) == FORMAT_FIELDS["prompt_completion"] for row in sft)
    assert dpo[1] == {"prompt": "Q: train 1\nA: ", "chosen": "return 1", "rejected": "pass"}
    assert all(tuple(row) == FORMAT_FIELDS["preference"] for row in dpo)
    assert json.loads(contents["eval.jsonl"].split("\n")[0])["prompt"] == "Q: eval 0\nA: "
    assert (
        contents["calibration.txt"]
        == "Q: calibration 0\nA: return 0\n\nQ: calibration 1\nA: return 1\n\nQ: calibration 2\nA: return 2\n"
    )
    assert (
        contents["eval.txt"] == "Q: eval 0\nA: return 0\n\nQ: eval 1\nA: return 1\n\nQ: eval 2\nA: return 2\n"
    )


def test_a_set_the_service_would_refuse_fails_the_stage() -> None:
    splits = _splits()
    splits["train"]["instructions"][1]["completion"] = "  "
    with pytest.raises(
        ValueError, match=r"sft\.jsonl: the training service would refuse it: .*line 2: 'completion' is empty"
    ):
        build.build(splits)
    splits = _splits()
    splits["eval"]["instructions"] = []
    with pytest.raises(ValueError, match=r"eval\.jsonl: .*no rows"):
        build.build(splits)
    splits = _splits()
    splits["calibration"]["instructions"] = []
    with pytest.raises(ValueError, match="no calibration records"):
        build.build(splits)
    with pytest.raises(ValueError, match="must contain"):
        build.render_prompt("x", "no placeholder")


def test_the_stages_run_end_to_end_in_process(tmp_path: Path) -> None:
    """ingest -> clean -> split -> build through their CLIs with the shipped params (fewer functions)."""
    params = load_params(PIPELINES / "params.yaml")
    params["ingest"]["max_functions"] = 100
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(params))
    data = tmp_path / "data"
    common = ["--params", str(params_file)]
    ingest_argv = ["--seed-dir", str(PIPELINES / "data" / "seed"), "--out-dir", str(data / "raw")]
    ingest_argv += ["--report", str(tmp_path / "reports" / "ingest.json")]
    assert ingest.main(common + ingest_argv) == 0
    clean_argv = ["--in-dir", str(data / "raw"), "--out-dir", str(data / "clean")]
    assert clean.main([*common, *clean_argv, "--report", str(tmp_path / "reports" / "clean.json")]) == 0
    assert split.main([*common, "--in-dir", str(data / "clean"), "--out-dir", str(data / "split")]) == 0
    assert build.main([*common, "--in-dir", str(data / "split"), "--out-dir", str(data / "prepared")]) == 0

    report = json.loads((tmp_path / "reports" / "clean.json").read_text())
    raw_count = len(read_jsonl(data / "raw" / "instructions.jsonl"))
    assert report["instructions"]["input"] == raw_count
    assert report["instructions"]["kept"] + sum(report["instructions"]["dropped"].values()) == raw_count
    prepared = data / "prepared"
    sft = validate_rows((prepared / "sft.jsonl").read_bytes(), None, "sft")
    dpo = validate_rows((prepared / "dpo.jsonl").read_bytes(), None, "dpo")
    evaluation = validate_rows((prepared / "eval.jsonl").read_bytes(), None, "sft")
    assert sft[0] == evaluation[0] == "prompt_completion" and dpo[0] == "preference"
    assert sft[1] + evaluation[1] <= report["instructions"]["kept"]
    assert (prepared / "calibration.txt").read_text().startswith("### Instruction:\n")
    # nothing evaluated on was trained on
    trained = {row["prompt"] for row in read_jsonl(prepared / "sft.jsonl")}
    assert trained.isdisjoint(row["prompt"] for row in read_jsonl(prepared / "eval.jsonl"))
