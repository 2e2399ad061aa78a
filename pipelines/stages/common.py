"""What every stage shares: the params file, JSON-lines I/O, stable hashing and the default paths.

Files are written deterministically (UTF-8, ``\\n`` line ends, keys in insertion order, no ASCII
escaping), so equal records give equal bytes and DVC sees no change where there is none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

Record = dict[str, Any]

#: ``pipelines/``: default paths are relative to it, wherever the stage is started from.
PIPELINE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = PIPELINE_DIR / "params.yaml"
#: The splits, in the order their hash intervals are laid out on [0, 1).
SPLITS: tuple[str, ...] = ("train", "eval", "calibration")
#: The datasets that flow through the stages, and the fields each needs (all strings).
DATASETS: dict[str, tuple[str, ...]] = {
    "instructions": ("prompt", "completion"),
    "preferences": ("prompt", "chosen", "rejected"),
}


def load_params(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The params file as a dict (a missing or non-mapping file is an error, not empty params)."""
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of parameters")
    return loaded


def read_jsonl(path: Path) -> list[Record]:
    """The objects of a JSON-lines file (blank lines skipped; lines end at ``\\n`` only)."""
    records: list[Record] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records


def dumps_jsonl(records: Iterable[Record]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_jsonl(path: Path, records: Iterable[Record]) -> int:
    """Write ``records`` (creating folders); returns how many were written."""
    rows = list(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_jsonl(rows), encoding="utf-8", newline="\n")
    return len(rows)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="\n")


def stable_unit(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts`` (SHA-256; no process hash seed)."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the ``--params`` option every stage takes."""
    cli = argparse.ArgumentParser(description=(description or "").strip().split("\n\n")[0])
    cli.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params.yaml (default: %(default)s)")
    return cli


def pipeline_path(relative: str) -> Path:
    """``relative`` under ``pipelines/`` (the default of a stage's path options)."""
    return PIPELINE_DIR / relative


def iter_dataset_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """``(dataset, folder/<dataset>.jsonl)`` for each dataset, in a fixed order."""
    for name in DATASETS:
        yield name, folder / f"{name}.jsonl"
