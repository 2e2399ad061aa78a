"""Which checkpoints of a job are complete: ``checkpoint-<step>/`` with a readable trainer state.

The trainer writes ``trainer_state.json`` last (after weights, optimizer, scheduler and RNG state),
so a folder without it is a save that a lost worker never finished and is not resumed from.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAINER_STATE = "trainer_state.json"


def is_complete(folder: Path) -> bool:
    try:
        json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(checkpoint_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint (step, folder) under ``checkpoint_dir``, if any."""
    found: list[tuple[int, Path]] = []
    if checkpoint_dir.is_dir():
        for folder in checkpoint_dir.glob("checkpoint-*"):
            step = folder.name.removeprefix("checkpoint-")
            if step.isdigit() and is_complete(folder):
                found.append((int(step), folder))
    return max(found) if found else None
