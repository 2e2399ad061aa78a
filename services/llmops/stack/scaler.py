"""Scale to zero in the embedded stack: stop an idle serving replica, start it when requests wait.

``llmops up --scale-to-zero-after SECONDS`` puts the router in front of serving and starts this
scaler as one more part of the stack (``python -m llmops.stack.scaler <data_dir>/scaler.json``). It
reads the router's ``/metrics`` every ``poll_seconds`` (no new API: the signals KEDA reads in a
cluster):

* **idle**: a replica whose models had no request through the router
  (``llmops_router_requests_total{model}`` unchanged), none in flight on it
  (``llmops_router_endpoint_in_flight{endpoint}``) and none waiting for it
  (``llmops_router_pending_requests{model}``) for ``idle_seconds`` is stopped: SIGTERM to its process
  group, so it drains like any serving process, then SIGKILL after ``grace_seconds``;
* **wake**: a stopped replica with requests pending for one of its models is started again, with
  the same command, settings and ports as before: the router's static list names its address, and
  the router retries a DOWN replica's streams, so it rejoins the rotation as soon as its model is
  READY. The held requests are answered then, or get DEADLINE_EXCEEDED when their deadline passes
  first (the router's request holding).

A replica's models are the served names the router reports for its address
(``llmops_router_endpoint_load{endpoint,model}``) while it runs; a request names a model as
``name``, ``name@alias`` or ``name:version`` and matches on ``name``. Before the router has seen a
replica's models, any pending request wakes it. A replica comes back with its start-up model
(``serving.model``), so scale to zero needs one.

The scaler records a restarted replica's pid in ``stack.json`` (``llmops down`` stops it from
there) and acts only once ``up`` has written that file. It logs one line per stop and start; the
router's ``llmops_router_hold_seconds`` says how long the held requests waited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llmops.common import metric_names as names
from llmops.common.process import alive, forget, popen, watch

STATE_FILE = "stack.json"
CONFIG_FILE = "scaler.json"


@dataclasses.dataclass(frozen=True)
class ReplicaLaunch:
    """How to start one serving replica again, exactly as the stack first started it."""

    name: str
    address: str  # gRPC host:port, fixed (the router's static list)
    args: list[str]
    env: dict[str, str]
    log: str


@dataclasses.dataclass(frozen=True)
class ScalerConfig:
    data_dir: str
    router_metrics: str  # the router's /metrics URL
    idle_seconds: float
    replicas: list[ReplicaLaunch]
    poll_seconds: float = 0.25
    grace_seconds: float = 15.0
    detached: bool = False

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> ScalerConfig:
        data = json.loads(path.read_text())
        data["replicas"] = [ReplicaLaunch(**r) for r in data["replicas"]]
        return cls(**data)


@dataclasses.dataclass
class RouterSignals:
    """What the router's /metrics says now."""

    pending: dict[str, float] = dataclasses.field(default_factory=dict)  # by requested model
    requests: dict[str, float] = dataclasses.field(default_factory=dict)  # by requested model, all codes
    in_flight: dict[str, float] = dataclasses.field(default_factory=dict)  # by endpoint address
    served: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # endpoint -> served names


def parse_signals(text: str) -> RouterSignals:
    """The scaler's signals from a router's /metrics page."""
    signals = RouterSignals()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == names.ROUTER_PENDING_REQUESTS:
                signals.pending[labels["model"]] = signals.pending.get(labels["model"], 0) + sample.value
            elif sample.name == names.ROUTER_REQUESTS_TOTAL:
                signals.requests[labels["model"]] = signals.requests.get(labels["model"], 0) + sample.value
            elif sample.name == names.ROUTER_ENDPOINT_IN_FLIGHT:
                signals.in_flight[labels["endpoint"]] = sample.value
            elif sample.name == names.ROUTER_ENDPOINT_LOAD:
                signals.served.setdefault(labels["endpoint"], set()).add(labels["model"])
    return signals


def model_name(requested: str) -> str:
    """``name`` of ``name@alias`` / ``name:version`` / ``name``."""
    for separator in ("@", ":"):
        requested = requested.split(separator, 1)[0]
    return requested


@dataclasses.dataclass
class ReplicaState:
    launch: ReplicaLaunch
    pid: int | None
    models: set[str] = dataclasses.field(default_factory=set)
    last_active: float = 0.0
    seen_requests: float = -1.0

    def wants(self, requested: str) -> bool:
        return not self.models or model_name(requested) in self.models or requested in self.models


class Scaler:
    """Decides, from router signals, which replicas to stop and start; ``stop``/``start`` do it.

    Args:
        replicas: the replicas it manages, with the pid each runs as now (None: stopped).
        idle_seconds: how long without traffic before a replica is stopped.
        start: starts a replica, returns its pid. stop: stops the process with this pid (drains).
        say: one line per action.
    """

    def __init__(
        self,
        replicas: Sequence[ReplicaState],
        idle_seconds: float,
        start: Callable[[ReplicaLaunch], int],
        stop: Callable[[int], None],
        say: Callable[[str], None] = print,
    ) -> None:
        self.replicas = list(replicas)
        self.idle_seconds = idle_seconds
        self._start = start
        self._stop = stop
        self._say = say

    def step(self, signals: RouterSignals, now: float) -> list[tuple[str, str]]:
        """One decision round; returns the actions taken as (``start`` | ``stop``, replica name)."""
        actions: list[tuple[str, str]] = []
        for replica in self.replicas:
            address = replica.launch.address
            if signals.served.get(address):
                replica.models = set(signals.served[address])
            pending = sum(n for model, n in signals.pending.items() if n > 0 and replica.wants(model))
            requests = sum(n for model, n in signals.requests.items() if replica.wants(model))
            busy = pending > 0 or signals.in_flight.get(address, 0) > 0 or requests != replica.seen_requests
            replica.seen_requests = requests
            if busy or replica.last_active == 0.0:
                replica.last_active = now
            if replica.pid is None:
                if pending > 0:
                    self._say(f"{pending:g} requests wait for {sorted(replica.models) or 'any model'}: "
                              f"starting {replica.launch.name}")  # fmt: skip
                    replica.pid = self._start(replica.launch)
                    replica.last_active = now  # idle counts from its start
                    actions.append(("start", replica.launch.name))
                continue
            if now - replica.last_active >= self.idle_seconds:
                self._say(f"{replica.launch.name} idle for {now - replica.last_active:.1f} s: stopping it")
                self._stop(replica.pid)
                replica.pid = None
                actions.append(("stop", replica.launch.name))
        return actions


def read_router(url: str, timeout: float = 2.0) -> RouterSignals | None:
    """The router's signals, or None while it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse_signals(response.read().decode())
    except (OSError, ValueError):
        return None


def stop_group(pid: int, grace_seconds: float) -> None:
    """SIGTERM the process group (serving drains), SIGKILL it after ``grace_seconds``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    forget(pid)


def record_pid(data_dir: Path, part: str, pid: int) -> None:
    """Write ``part``'s new pid into ``stack.json`` (atomically: ``llmops down`` may read it now)."""
    path = data_dir / STATE_FILE
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(path.read_text())
        for entry in state["parts"]:
            if entry["name"] == part:
                entry["pid"] = pid
        staging = path.with_suffix(".json.partial")
        staging.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(staging, path)


def stack_pids(data_dir: Path) -> Mapping[str, int] | None:
    """Part name -> pid from ``stack.json``; None until ``up`` has written it."""
    try:
        return {p["name"]: int(p["pid"]) for p in json.loads((data_dir / STATE_FILE).read_text())["parts"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run(config: ScalerConfig, stop_event: Callable[[], bool]) -> None:
    """The scaler's loop, until ``stop_event()`` is true; replicas it started are stopped then."""
    data_dir = Path(config.data_dir)
    tied = not config.detached
    started: set[int] = set()

    def start(launch: ReplicaLaunch) -> int:
        with Path(launch.log).open("ab") as handle:
            process: subprocess.Popen[Any] = popen(
                launch.args, tied=tied, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                env={**os.environ, **launch.env}, cwd=os.getcwd(), start_new_session=True,
            )  # fmt: skip
        if tied:
            watch(process.pid, group=True)
        started.add(process.pid)
        record_pid(data_dir, launch.name, process.pid)
        return process.pid

    def stop(pid: int) -> None:
        stop_group(pid, config.grace_seconds)
        started.discard(pid)

    pids = stack_pids(data_dir)
    while pids is None or pids.get("scaler") != os.getpid():  # `up` has not finished yet
        if stop_event():
            return
        time.sleep(config.poll_seconds)
        pids = stack_pids(data_dir)
    replicas = [ReplicaState(launch, pids.get(launch.name)) for launch in config.replicas]
    scaler = Scaler(replicas, config.idle_seconds, start, stop, say=lambda line: print(line, flush=True))
    print(f"scaler: {len(replicas)} replicas, stopped after {config.idle_seconds:g} s idle", flush=True)
    try:
        while not stop_event():
            for replica in replicas:  # one that exited on its own is stopped: the next request starts it
                if replica.pid is not None and (replica.pid <= 0 or not alive(replica.pid)):
                    with contextlib.suppress(ChildProcessError, OSError):
                        os.waitpid(replica.pid, os.WNOHANG)
                    print(f"{replica.launch.name} (pid {replica.pid}) is not running", flush=True)
                    started.discard(replica.pid)
                    replica.pid = None
            signals = read_router(config.router_metrics)
            if signals is not None:
                scaler.step(signals, time.monotonic())
            time.sleep(config.poll_seconds)
    finally:
        for pid in list(started):
            stop_group(pid, config.grace_seconds)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m llmops.stack.scaler <scaler.json>")
    config = ScalerConfig.read(Path(args[0]))
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    run(config, lambda: bool(stopping))


if __name__ == "__main__":
    main()
