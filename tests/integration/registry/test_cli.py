"""``llmops models ...`` against a real registry server: what a user types, what they see.

Invariants: register uploads a folder and prints the new version; list/show/lineage print what the
server holds (tables, or JSON with --json); alias moves and deletes with the move echoed; download
writes verified files identical to the upload; server errors exit 1 with the status name.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from llmops.cli import app
from tests.integration.registry.conftest import RunningRegistry, same_files


async def _cli(registry: RunningRegistry, *args: str) -> Result:
    runner = CliRunner()
    # The command runs its own event loop: keep it off this one, which serves the registry.
    return await asyncio.to_thread(
        runner.invoke, app, ["models", *args, "--address", registry.address], env={"COLUMNS": "200"}
    )


async def test_models_commands_end_to_end(registry: RunningRegistry, llama_dir: Path, tmp_path: Path) -> None:
    result = await _cli(
        registry,
        "register", "clitiny", str(llama_dir), "--format", "fp32", "--alias", "champion",
        "--tag", "team=nlp", "--metric", "eval_loss=1.5", "--description", "from the CLI",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "registered clitiny:1" in result.output

    listed = await _cli(registry, "list", "--prefix", "clitiny")
    assert listed.exit_code == 0 and "clitiny" in listed.output and "champion→1" in listed.output

    shown = await _cli(registry, "show", "clitiny:1", "--json")
    assert shown.exit_code == 0, shown.output
    version = json.loads(shown.output)
    assert (version["name"], version["version"], version["format"]) == ("clitiny", "1", "MODEL_FORMAT_FP32")
    assert version["tags"] == {"team": "nlp"} and version["metrics"] == {"eval_loss": 1.5}

    moved = await _cli(registry, "alias", "clitiny", "challenger", "1", "--expect", "0", "--reason", "try it")
    assert moved.exit_code == 0 and "clitiny@challenger: nothing → 1" in moved.output
    removed = await _cli(registry, "alias", "clitiny", "challenger", "--delete")
    assert removed.exit_code == 0 and "1 → nothing" in removed.output
    history = await _cli(registry, "show", "clitiny", "--history")
    assert history.exit_code == 0 and "try it" in history.output and "challenger" in history.output

    destination = tmp_path / "out"
    downloaded = await _cli(registry, "download", "clitiny@champion", str(destination))
    assert downloaded.exit_code == 0, downloaded.output
    assert same_files(llama_dir, destination)

    lineage = await _cli(registry, "lineage", "clitiny:1")
    assert lineage.exit_code == 0 and "clitiny:1 [fp32]" in lineage.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("show", "nope"), "NOT_FOUND"),
        (("alias", "nope", "champion", "1"), "NOT_FOUND"),
        (("register", "bad", "/nonexistent-folder", "--format", "fp32"), "does not exist"),
    ],
)
async def test_errors_exit_nonzero_with_the_status(
    registry: RunningRegistry, args: tuple[str, ...], expected: str
) -> None:
    result = await _cli(registry, *args)
    assert result.exit_code != 0
    assert expected in result.output
