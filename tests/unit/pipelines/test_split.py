"""Split puts each record in train, eval or calibration by hashing the seed and its prompt.

Invariants: a record's split does not depend on the other records or their order; an instruction
and a preference with the same prompt land in the same split; the fractions are met within
sampling error; another seed gives another assignment; fractions that are negative or do not sum
to 1 are refused; a zero fraction gets no records.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipelines.stages import split
from pipelines.stages.common import SPLITS, read_jsonl, write_jsonl

FRACTIONS = {"train": 0.8, "eval": 0.1, "calibration": 0.1}


def _records(count: int) -> list[dict[str, str]]:
    return [
        {"id": str(i), "prompt": f"Write function number {i}.", "completion": "pass"} for i in range(count)
    ]


def test_a_record_lands_in_the_same_split_whatever_else_is_there() -> None:
    records = _records(500)
    alone = {r["id"]: split.assign(r, 5, FRACTIONS) for r in records}
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    parts = split.split_records(shuffled[:300], 5, FRACTIONS)
    for name, rows in parts.items():
        assert all(alone[r["id"]] == name for r in rows)
    assert sorted(len(rows) for rows in parts.values()) != [0, 0, 300]


def test_each_split_keeps_input_order_and_every_record_is_placed_once() -> None:
    records = _records(200)
    parts = split.split_records(records, 5, FRACTIONS)
    assert list(parts) == list(SPLITS)
    placed = [r["id"] for rows in parts.values() for r in rows]
    assert sorted(placed, key=int) == [r["id"] for r in records]
    for rows in parts.values():
        assert [int(r["id"]) for r in rows] == sorted(int(r["id"]) for r in rows)


def test_instructions_and_preferences_of_one_prompt_share_the_split() -> None:
    for record in _records(300):
        preference = {"prompt": record["prompt"], "chosen": "a", "rejected": "b"}
        assert split.assign(record, 9, FRACTIONS) == split.assign(preference, 9, FRACTIONS)


@pytest.mark.parametrize("fractions", [FRACTIONS, {"train": 0.5, "eval": 0.3, "calibration": 0.2}])
def test_fractions_are_met(fractions: dict[str, float]) -> None:
    count = 20_000
    parts = split.split_records(_records(count), 1, fractions)
    for name, share in fractions.items():
        # 5 standard deviations of a binomial proportion
        tolerance = 5 * (share * (1 - share) / count) ** 0.5
        assert abs(len(parts[name]) / count - share) < tolerance, name


def test_another_seed_gives_another_assignment() -> None:
    records = _records(200)
    first = [split.assign(r, 1, FRACTIONS) for r in records]
    assert first == [split.assign(r, 1, FRACTIONS) for r in records]
    assert first != [split.assign(r, 2, FRACTIONS) for r in records]


def test_a_zero_fraction_gets_nothing() -> None:
    parts = split.split_records(_records(1000), 3, {"train": 0.9, "eval": 0.1, "calibration": 0.0})
    assert parts["calibration"] == [] and len(parts["train"]) + len(parts["eval"]) == 1000


@pytest.mark.parametrize(
    "section",
    [
        {"train": 0.8, "eval": 0.1, "calibration": 0.2},
        {"train": 1.1, "eval": -0.1, "calibration": 0.0},
        {"train": 0.8},
    ],
)
def test_bad_fractions_are_refused(section: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        split.fractions_of({"split": section})


def test_the_stage_writes_a_file_per_split_and_dataset(tmp_path: Path) -> None:
    records = _records(100)
    write_jsonl(tmp_path / "clean" / "instructions.jsonl", records)
    write_jsonl(
        tmp_path / "clean" / "preferences.jsonl",
        [{"prompt": r["prompt"], "chosen": "a", "rejected": "b"} for r in records],
    )
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"seed": 4, "split": FRACTIONS}))
    out = tmp_path / "split"
    assert (
        split.main(["--params", str(params), "--in-dir", str(tmp_path / "clean"), "--out-dir", str(out)]) == 0
    )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jsonl")) == sorted(
        f"{name}/{dataset}.jsonl" for name in SPLITS for dataset in ("instructions", "preferences")
    )
    for name in SPLITS:
        prompts = [r["prompt"] for r in read_jsonl(out / name / "instructions.jsonl")]
        assert prompts == [r["prompt"] for r in read_jsonl(out / name / "preferences.jsonl")]
    assert sum(len(read_jsonl(out / name / "instructions.jsonl")) for name in SPLITS) == 100
