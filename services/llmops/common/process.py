"""Child processes that die with the process that started them, however it ends (SIGKILL, a segfault).

A process that is killed runs no cleanup code, so whatever it started keeps running unless
something outside it ends them. Every child the platform, its tests and benchmarks start goes
through here, with two tools:

* **A parent-death signal.** :func:`popen`, :func:`run` and :func:`create_subprocess_exec` start
  the child with ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` set in it before it runs its program: the
  kernel kills the child when its parent goes. util-linux's ``setpriv --pdeathsig KILL`` sets it
  and then executes the program, so no Python code runs in the forked child (a ``preexec_fn`` in
  a process with many threads, torch's and grpc's, crashed there once; it is only the fallback
  where ``setpriv`` is missing). Linux sends that signal when the *thread* that
  forked the child exits, not the process; so :func:`popen` forks from the main thread or from one
  spawner thread that lives as long as the process, :func:`run` blocks its thread until the child
  ends, and an asyncio child is forked by its event loop's thread, which outlives the loop's
  children. The signal is not inherited: it ties children, not grandchildren.
* **A reaper.** :func:`watch` hands a process, or a whole process group, to this process's reaper:
  a small watchdog process (this file run as a script) holding the read end of a pipe
  that only this process writes to. When this process ends, the pipe closes and the reaper SIGKILLs
  what it still watches, then exits. It covers what the parent-death signal cannot: grandchildren
  (a stack service's Ray runtime or vLLM's EngineCore, in that service's process group) and
  children a library starts without a hook into the fork (vLLM's EngineCore, through
  ``multiprocessing``). A process is identified by its pid and start time, so a reused pid is never
  killed; :func:`forget` drops one that was stopped on purpose.

A child started ``tied=False`` is left alone: ``llmops up`` starts the stack that way (each part in
its own session) so it outlives the command, and ``llmops down`` stops it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

PR_SET_PDEATHSIG = 1
_SETPRIV = shutil.which("setpriv")
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_prctl = _libc.prctl if _libc is not None else None  # looked up now: a fork's child only calls it


def die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when its parent's forking thread ends; a child whose
    parent ``parent`` is already gone (it died between the fork and this call) kills itself."""

    def tie() -> None:
        if _prctl is not None and _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return tie


def _tied(args: Sequence[str], kwargs: dict[str, Any]) -> list[str]:
    """``args`` run so that the child gets SIGKILL when its parent's forking thread ends."""
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *args]
    kwargs["preexec_fn"] = die_with(os.getpid())
    return list(args)


class _Spawner:
    """One daemon thread, started on first use, that forks the tied children asked for from other
    threads: it lives as long as the process, so their parent-death signal fires only when the
    process ends, not when a short-lived worker thread does."""

    _lock = threading.Lock()
    _jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] | None = None
    _owner = 0

    @classmethod
    def call(cls, job: Callable[[], Any]) -> Any:
        with cls._lock:
            if cls._jobs is None or cls._owner != os.getpid():  # a fork's child has no such thread
                cls._jobs, cls._owner = queue.SimpleQueue(), os.getpid()
                threading.Thread(
                    target=cls._serve, args=(cls._jobs,), name="llmops-spawner", daemon=True
                ).start()
            jobs = cls._jobs
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        jobs.put((job, done))
        return done.result()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]) -> None:
        while True:
            job, done = jobs.get()
            try:
                done.set_result(job())
            except BaseException as exc:  # handed to the caller's thread
                done.set_exception(exc)


def popen(args: Sequence[str], *, tied: bool = True, **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, **kwargs)``; ``tied``: the child dies with this process.

    A tied child is forked by the main thread, or from any other thread by the spawner thread.
    """
    if not tied:
        return subprocess.Popen(list(args), **kwargs)
    command = _tied(args, kwargs)
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(command, **kwargs)
    return _Spawner.call(lambda: subprocess.Popen(command, **kwargs))  # type: ignore[no-any-return]


def run(
    args: Sequence[str],
    *,
    group: bool = False,
    check: bool = False,
    timeout: float | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` with the child tied to this process (the calling thread waits for it, so
    the thread outlives the child).

    With ``group`` the child runs in a process group of its own that the reaper watches, so what it
    starts dies with this process too (``dvc repro`` and its stages); if the wait ends early (a
    timeout, Ctrl-C) the whole group is killed.
    """
    command = _tied(args, kwargs)
    if not group:
        return subprocess.run(command, check=check, timeout=timeout, **kwargs)
    with subprocess.Popen(command, start_new_session=True, **kwargs) as child:
        watch(child.pid, group=True)
        try:
            out, err = child.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            raise
        finally:
            forget(child.pid)
    if check and child.returncode:
        raise subprocess.CalledProcessError(child.returncode, list(args), out, err)
    return subprocess.CompletedProcess(list(args), child.returncode, out, err)


async def create_subprocess_exec(
    program: str, *args: str, tied: bool = True, **kwargs: Any
) -> asyncio.subprocess.Process:
    """``asyncio.create_subprocess_exec``; ``tied``: the child dies with this process.

    The event loop's thread forks it: keep the loop running as long as the child (a loop's child
    should not outlive the loop anyway).
    """
    if not tied:
        return await asyncio.create_subprocess_exec(program, *args, **kwargs)
    command = _tied([program, *args], kwargs)
    return await asyncio.create_subprocess_exec(*command, **kwargs)


# The reaper -------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (another user's process counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0] != "Z"
    return True


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or ``None`` when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


class _Reaper:
    _lock = threading.Lock()
    _pipe: IO[str] | None = None
    _owner = 0

    @classmethod
    def send(cls, line: str) -> None:
        with cls._lock:
            for attempt in (1, 2):
                if cls._pipe is None or cls._owner != os.getpid():  # a fork's child needs its own
                    cls._pipe, cls._owner = cls._start(), os.getpid()
                try:
                    cls._pipe.write(line + "\n")
                    cls._pipe.flush()
                    return
                except (BrokenPipeError, ValueError):  # the reaper is gone: start another
                    cls._pipe = None
                    if attempt == 2:
                        raise

    @staticmethod
    def _start() -> IO[str]:
        # This file as a script, isolated (-I): the standard library only, no llmops import, and its
        # folder (which has a logging.py) is not put on the path.
        reaper = subprocess.Popen(
            [sys.executable, "-I", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # a Ctrl-C or a group kill meant for us does not stop it
        )
        assert reaper.stdin is not None
        return reaper.stdin


def watch_multiprocessing_children() -> list[int]:
    """Hand every live ``multiprocessing`` child of this process to the reaper (vLLM's EngineCore:
    started by a library, with no hook into its fork); returns their pids, for :func:`forget`."""
    import multiprocessing

    pids = [child.pid for child in multiprocessing.active_children() if child.pid is not None]
    for pid in pids:
        watch(pid)
    return pids


def watch(pid: int, *, group: bool = False) -> None:
    """Have this process's reaper SIGKILL ``pid`` (with ``group``: its whole process group, of which
    it is the leader) when this process ends, unless :func:`forget` comes first."""
    started = start_time(pid)
    if started is not None:
        _Reaper.send(f"+ {'g' if group else 'p'} {pid} {started}")


def forget(pid: int) -> None:
    """The process was stopped on purpose: the reaper leaves its pid alone from now on."""
    if _Reaper._pipe is not None and _Reaper._owner == os.getpid():
        with contextlib.suppress(OSError, ValueError):
            _Reaper.send(f"- {pid}")


def _reap(lines: IO[str]) -> None:
    """The reaper's loop: read what to watch until the pipe closes, then kill what is still there."""
    watched: dict[int, tuple[bool, int]] = {}
    for line in lines:
        op, *fields = line.split()
        if op == "+":
            kind, number, since = fields
            watched[int(number)] = (kind == "g", int(since))
        elif op == "-":
            watched.pop(int(fields[0]), None)
    for pid, (group, started) in watched.items():
        leader = start_time(pid)
        if leader is not None and leader != started:
            continue  # the pid is someone else's now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                # The group outlives its leader: a group whose leader died with us is still ours.
                os.killpg(pid, signal.SIGKILL)
            elif leader is not None:
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ends when its parent does, and only then
    _reap(sys.stdin)
