"""Child processes die with the process that started them, however it dies; a detached stack does not.

Invariants: when the process that started a tied embedded stack (as tests and ``llmops demo`` do)
is SIGKILLed, every process under it goes too: Redis, each service, the reaper, and every process
in a part's process group; when a process that started ``multiprocessing`` children it handed to
the reaper (vLLM's EngineCore, in the serving process) is SIGKILLed, those children go too; a
detached stack (``llmops up``) outlives its starter until ``down`` stops it.

Every process here is real (``redis-server``, ``llmops serve registry`` and ``cache``, a spawned
``multiprocessing`` child); the parent is a throwaway Python process made for the test. Deaths are
polled for, within a bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmops.cache.redis_server import ping
from llmops.common.process import popen
from llmops.stack.stack import LocalStack, StackOptions, read_state
from tests.conftest import require_tool

pytestmark = pytest.mark.slow

STACK_STARTER = """
import sys, time
from pathlib import Path
from llmops.stack.stack import LocalStack, StackOptions

services = tuple(s for s in sys.argv[3].split(",") if s)
options = StackOptions(data_dir=Path(sys.argv[1]), services=services, prometheus=False, mlflow_ui=False,
                       detached=sys.argv[2] == "detached")
LocalStack(options).up()
print("UP", flush=True)
time.sleep(3600)
"""

# A service-like process: a multiprocessing child (spawned, as vLLM's EngineCore is) handed to the reaper.
MULTIPROCESSING_PARENT = """
import multiprocessing, time
from llmops.common.process import watch_multiprocessing_children

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(3600,), daemon=True)
    child.start()
    watch_multiprocessing_children()
    print("UP", child.pid, flush=True)
    time.sleep(3600)
"""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], pgid [2])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _live(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> set[int]:
    """Every live process under ``root`` (by parent links), and every member of their process groups."""
    parents = {pid: int(f[1]) for pid in _all_pids() if (f := _stat(pid)) is not None}
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    groups = {int(f[2]) for pid in found if (f := _stat(pid)) is not None}
    found |= {pid for pid in _all_pids() if (f := _stat(pid)) is not None and int(f[2]) in groups}
    found.discard(root)
    return {pid for pid in found if _live(pid)}


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def start(script: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """The throwaway parent, run until it prints its ``UP`` line."""
    # A session of its own: its process group holds only it and what it starts.
    parent = popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert parent.stdout is not None
    line = parent.stdout.readline()
    assert line.startswith("UP"), f"the parent did not start: {line!r} (exit {parent.poll()})"
    return parent, line


def kill(parent: subprocess.Popen[str]) -> None:
    parent.send_signal(signal.SIGKILL)
    parent.wait(30)


def gone_within(pids: set[int], seconds: float) -> set[int]:
    """Poll until none of ``pids`` lives; returns those still alive at the bound."""
    deadline = time.monotonic() + seconds
    while (left := {pid for pid in pids if _live(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_a_tied_stack_dies_with_its_starter(tmp_path: Path) -> None:
    require_tool("redis-server")
    parent, _ = start(STACK_STARTER, str(tmp_path / "stack"), "tied", "registry,cache")
    try:
        tree = descendants(parent.pid)
        commands = " | ".join(command(pid) for pid in tree)
        assert "redis-server" in commands and "serve registry" in commands and "serve cache" in commands
    finally:
        kill(parent)
    left = gone_within(tree, 30.0)
    assert not left, f"still running after their starter died: {[command(pid) for pid in left]}"


def test_multiprocessing_children_handed_to_the_reaper_die_with_their_parent() -> None:
    parent, line = start(MULTIPROCESSING_PARENT)
    child = int(line.split()[1])
    try:
        tree = descendants(parent.pid)
        assert child in tree
    finally:
        kill(parent)
    left = gone_within(tree, 30.0)
    assert not left, f"still running after their parent died: {[command(pid) for pid in left]}"


def test_a_detached_stack_outlives_its_starter_until_down(tmp_path: Path) -> None:
    require_tool("redis-server")
    data_dir = tmp_path / "stack"
    parent, _ = start(STACK_STARTER, str(data_dir), "detached", "")
    kill(parent)  # its children got any parent-death signal as it exited, before this returns
    state = read_state(data_dir)
    assert state is not None and [p.name for p in state.parts] == ["redis"]
    redis = state.parts[0]
    try:
        assert _live(redis.pid) and ping(int(redis.address.rsplit(":", 1)[1]))
    finally:
        stopped = LocalStack(StackOptions(data_dir=data_dir, grace_seconds=5)).down()
    assert stopped == ["redis"]
    assert not gone_within({redis.pid}, 10.0)
