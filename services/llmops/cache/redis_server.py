"""A ``redis-server`` child process on a free local port, for the embedded stack, tests and benchmarks.

Redis cannot pick its own port (``--port 0`` disables TCP), so a free one is found by binding port 0
and the start is retried on another port if Redis loses the race for it. Readiness is a PING
answered, polled every few milliseconds; nothing is persisted (``--save '' --appendonly no``).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from llmops.common.process import popen


class RedisServerError(RuntimeError):
    """redis-server is missing or did not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ping(port: int, timeout: float = 0.2) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` again keep the port (to test outages).

    Args:
        executable: path of redis-server (default: found on PATH).
        extra_args: more command-line settings, e.g. ``["--rename-command", "CONFIG", ""]``.
    """

    def __init__(self, executable: str | None = None, extra_args: list[str] | None = None) -> None:
        found = executable or shutil.which("redis-server")
        if found is None:
            raise RedisServerError("redis-server is not installed")
        self.executable = found
        self.extra_args = list(extra_args or [])
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="llmops-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        """Start (on the previous port when restarting) and return once it answers PING."""
        attempts = 1 if self.port else 3
        for _ in range(attempts):
            port = self.port or free_port()
            if self._launch(port, timeout):
                self.port = port
                return self
        raise RedisServerError(f"redis-server did not start: {self._log_tail()}")

    def _launch(self, port: int, timeout: float) -> bool:
        args = [
            self.executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        # Tied: it dies with this process (a test run, a benchmark), however that ends.
        self.process = popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # exited: most likely the port was taken meanwhile
                self.process = None
                return False
            if ping(port):
                return True
            time.sleep(0.005)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s) and wait for it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join((self._dir / "redis.log").read_text().strip().splitlines()[-3:])
        return "no log"

    def close(self) -> None:
        """Stop and remove the working folder."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
