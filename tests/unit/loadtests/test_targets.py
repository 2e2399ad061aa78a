"""Finding what to load-test: the local stack's recorded addresses, and ``make loadtest`` without one.

Invariant: the addresses come from a ``stack.json`` whose processes still live (serving, registry,
training, cache by gRPC address; Prometheus by URL); with no running stack and no address given the
run stops at once with exit code 2 and says how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmops.stack.stack import STATE_FILE, Part, StackState
from loadtests import run
from loadtests.targets import EXIT_TARGET, stack_addresses


def write_stack(folder: Path, pid: int) -> None:
    parts = [
        Part("redis", pid, address="127.0.0.1:6390"),
        Part("registry", pid, address="127.0.0.1:50051", metrics="http://127.0.0.1:9101/metrics"),
        Part("training", pid, address="127.0.0.1:50053"),
        Part("serving", pid, address="127.0.0.1:50054", url="http://127.0.0.1:8000/v1"),
        Part("prometheus", pid, url="http://127.0.0.1:9090"),
    ]
    (folder / STATE_FILE).write_text(StackState(str(folder), 0.0, parts).to_json())


def test_addresses_come_from_a_running_stack(tmp_path: Path) -> None:
    write_stack(tmp_path, os.getpid())
    found = stack_addresses(tmp_path)
    assert found["serving"] == "127.0.0.1:50054"
    assert found["registry"] == "127.0.0.1:50051"
    assert found["training"] == "127.0.0.1:50053"
    assert found["prometheus"] == "http://127.0.0.1:9090"


def test_a_stopped_stack_gives_no_addresses(tmp_path: Path) -> None:
    write_stack(tmp_path, 2**22 + 12345)  # above pid_max's default: no such process
    assert stack_addresses(tmp_path) == {}
    assert stack_addresses(tmp_path / "nothing-here") == {}


def test_make_loadtest_without_a_stack_or_address_says_what_to_do(tmp_path: Path, capsys: Any) -> None:
    assert run.main(["--data-dir", str(tmp_path)]) == EXIT_TARGET
    error = capsys.readouterr().err
    assert f"no local stack runs from {tmp_path}" in error
    assert "SERVING=HOST:PORT" in error
