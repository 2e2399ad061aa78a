"""Split: each cleaned record into train, eval or calibration, stably.

A record's split depends only on the seed and its prompt: SHA-256 of both gives a number in [0, 1),
and the fractions ``split.train``, ``split.eval``, ``split.calibration`` lay out consecutive
intervals of it. So a record lands in the same split whatever else is in the data, and an
instruction and the preference pair made from the same function (they share the prompt) land in
the same split: nothing evaluated or calibrated on was trained on.

    python -m stages.split [--params params.yaml] [--in-dir data/clean] [--out-dir data/split]

writes ``<out-dir>/<split>/<dataset>.jsonl`` for each split and dataset (in input order).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .common import (
    SPLITS,
    Record,
    iter_dataset_files,
    load_params,
    parser,
    pipeline_path,
    read_jsonl,
    stable_unit,
    write_jsonl,
)


def fractions_of(params: Mapping[str, Any]) -> dict[str, float]:
    """The split fractions (``params["split"]`` or the mapping itself), checked to be >= 0 and sum to 1."""
    section = params.get("split", params)
    fractions = {name: float(section.get(name, 0.0)) for name in SPLITS}
    if any(value < 0 for value in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, not {fractions}")
    return fractions


def assign(record: Record, seed: int, fractions: Mapping[str, float]) -> str:
    """The split of ``record``: from the seed and its prompt only."""
    point = stable_unit(seed, "split", record["prompt"])
    upper = 0.0
    for name in SPLITS:
        upper += fractions[name]
        if point < upper:
            return name
    return next(name for name in reversed(SPLITS) if fractions[name] > 0)  # rounding at 1.0


def split_records(
    records: Sequence[Record], seed: int, fractions: Mapping[str, float]
) -> dict[str, list[Record]]:
    """``{split: records}`` for every split, each in input order."""
    parts: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for record in records:
        parts[assign(record, seed, fractions)].append(record)
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser(__doc__)
    cli.add_argument("--in-dir", type=Path, default=pipeline_path("data/clean"))
    cli.add_argument("--out-dir", type=Path, default=pipeline_path("data/split"))
    args = cli.parse_args(argv)
    params = load_params(args.params)
    fractions = fractions_of(params)
    for dataset, path in iter_dataset_files(args.in_dir):
        parts = split_records(read_jsonl(path), int(params["seed"]), fractions)
        for name, rows in parts.items():
            write_jsonl(args.out_dir / name / path.name, rows)
        print(f"split {dataset}: " + ", ".join(f"{name} {len(rows)}" for name, rows in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
