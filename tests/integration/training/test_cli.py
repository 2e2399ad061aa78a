"""``llmops train ...`` against a real training server (thread runner, local model folders): what a
user types, what they see.

Invariants: ``submit --watch`` follows a LoRA job to its end, exits 0 and names the registered
result; status (``--json``) and list show the finished job; a malformed dataset row fails submission
with INVALID_ARGUMENT naming its line; server errors (unknown job, cancelling a finished one) exit 1
with the status name, never a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from typer.testing import CliRunner, Result

from llmops.cli import app
from llmops.common.app import start_app
from llmops.common.settings import Settings
from llmops.common.tiny_model import build_tiny_model
from llmops.training.app import build_app

pytestmark = pytest.mark.slow


@dataclass
class Server:
    address: str
    models: Path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def training(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    data_dir = tmp_path_factory.mktemp("training-cli")
    models = data_dir / "training" / "models"
    shutil.copytree(build_tiny_model().path, models / "tiny" / "1")
    repo = data_dir / "datarepo"
    repo.mkdir()
    row = json.dumps({"prompt": "def f3(x):", "completion": " return x + 3\n"})
    (repo / "sft.jsonl").write_text(f"{row}\n" * 24)
    (repo / "bad.jsonl").write_text(f"{row}\n{row}\n{{not json\n{row}\n")
    settings = Settings.model_validate(
        {
            "data_dir": str(data_dir),
            "health_poll_seconds": 0.05,
            "grace_seconds": 1,
            "training": {
                "port": 0,
                "metrics_port": 0,
                "address": "127.0.0.1:0",
                "runner": "thread",
                "use_registry": False,
                "tracking": False,
                "data_repo": str(repo),
                "poll_seconds": 0.1,
            },
        }
    )
    server, service = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    try:
        yield Server(f"127.0.0.1:{server.port}", models)
    finally:
        await server.stop(0)
        await service.close()


async def _cli(training: Server, *args: str) -> Result:
    runner = CliRunner()
    # The command runs its own event loop: keep it off this one, which serves the training service.
    return await asyncio.to_thread(
        runner.invoke, app, ["train", *args, "--address", training.address], env={"COLUMNS": "200"}
    )


async def test_submit_watch_then_status_list_cancel(training: Server) -> None:
    submitted = await _cli(
        training,
        "submit", "tiny:1", "sft.jsonl", "--method", "lora", "--max-steps", "4", "--batch-size", "4",
        "--log-every", "1", "--watch",
    )  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    assert "registered tiny-lora:1" in submitted.output
    assert "tiny-lora:1" in submitted.stdout  # the final table's result column
    assert (training.models / "tiny-lora" / "1").is_dir()
    found = re.search(r"submitted (tj-\S+)", submitted.output)
    assert found is not None, submitted.output
    job_id = found.group(1)
    assert job_id in submitted.stdout

    shown = await _cli(training, "status", job_id, "--json")
    assert shown.exit_code == 0, shown.output
    job = json.loads(shown.stdout)
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["result_version"] == {"name": "tiny-lora", "version": "1"}
    assert job["current_step"] == "4" and job["spec"]["lora"] is not None

    listed = await _cli(training, "list", "--state", "succeeded", "--model", "tiny-lora")
    assert listed.exit_code == 0, listed.output
    assert job_id in listed.stdout and "succeeded" in listed.stdout and "4/4" in listed.stdout

    cancelled = await _cli(training, "cancel", job_id, "--reason", "too late")
    assert cancelled.exit_code == 1
    assert "FAILED_PRECONDITION" in cancelled.output and "Traceback" not in cancelled.output


async def test_a_bad_dataset_row_is_rejected_naming_its_line(training: Server) -> None:
    result = await _cli(training, "submit", "tiny:1", "bad.jsonl", "--max-steps", "4")
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT" in result.output and "line 3" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("status", "nope"), "NOT_FOUND"),
        (("watch", "nope"), "NOT_FOUND"),
        (("submit", "ghost:1", "sft.jsonl"), "NOT_FOUND"),
        (("submit", "tiny:1", "missing.jsonl"), "NOT_FOUND"),
    ],
)
async def test_server_errors_exit_1_with_the_status(
    training: Server, args: tuple[str, ...], expected: str
) -> None:
    result = await _cli(training, *args)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output


async def test_bad_options_are_refused_before_any_call(training: Server) -> None:
    result = await _cli(training, "submit", "tiny:1", "sft.jsonl", "--method", "sft", "--lora-r", "4")
    assert result.exit_code == 2 and "do not apply to --method sft" in result.output
