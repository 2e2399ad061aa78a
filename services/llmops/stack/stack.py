"""The embedded stack on one machine: every service and its dependencies as child processes.

``up`` starts, in dependency order, Redis (``redis-server``), the registry (MLflow on a SQLite file
in the data folder), cache, quantization and training (each starting its local Ray runtime) and
serving, each as ``llmops serve <service>`` in its own session with its log in ``<data_dir>/logs/``; then,
when they are installed, Prometheus scraping every service's ``/metrics`` and an MLflow UI over the
same SQLite file. Each service is started only after the one before answers gRPC health SERVING,
and learns the real addresses of those it calls through ``LLMOPS_*_ADDRESS``. What runs where is
written to ``<data_dir>/stack.json``: a second ``up`` finds the first still running and says so,
``status`` checks each part, ``down`` stops them in reverse order (SIGTERM, then SIGKILL after the
grace period).

A stack is tied to the process that starts it unless it is ``detached``: tests and ``llmops demo``
start it tied, so every part, and every process a part starts (its process group: Ray, vLLM's
EngineCore), is killed when the starter dies, however it dies (:mod:`llmops.common.process`);
``llmops up`` starts it detached, to outlive the command until ``llmops down``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmops.common.process import alive, forget, popen, watch
from llmops.stack.dashboards import RULES, local_rules

STATE_FILE = "stack.json"
#: Start order: each service may call the ones before it.
SERVICES = ("registry", "cache", "quantization", "training", "serving")
_GRPC_NAMES = {s: f"llmops.{s}.v1.{s.capitalize()}Service" for s in (*SERVICES, "router")}
_LISTENING = re.compile(r"llmops (\w+) listening grpc=(\d+) metrics=(\d+|None)")


class StackError(RuntimeError):
    """A part of the stack did not start, or the stack is in a state the command cannot act on."""


@dataclasses.dataclass
class Part:
    """One running process of the stack."""

    name: str
    pid: int
    address: str = ""
    metrics: str = ""
    url: str = ""
    log: str = ""


@dataclasses.dataclass
class StackState:
    data_dir: str
    started_at: float
    parts: list[Part]

    def part(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StackState:
        data = json.loads(text)
        return cls(data["data_dir"], data["started_at"], [Part(**p) for p in data["parts"]])


@dataclasses.dataclass(frozen=True)
class StackOptions:
    data_dir: Path
    #: Ports by service name: (gRPC, metrics), and "http" for serving's OpenAI API; a service not
    #: named gets free ports (0). ``from_settings`` fills them from the settings' defaults.
    ports: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    http_port: int = 0
    #: Extra LLMOPS_* settings for every service (e.g. {"LLMOPS_SERVING_ENGINE": "transformers"}).
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    services: Sequence[str] = SERVICES
    prometheus: bool = True
    #: Prometheus' scrape and rule evaluation interval.
    scrape_interval: str = "5s"
    mlflow_ui: bool = True
    start_timeout: float = 180.0
    grace_seconds: float = 15.0
    #: Outlive the starting process (``llmops up``); otherwise every part dies with it.
    detached: bool = False
    #: Serving replicas; more than one puts the router in front of them (parts ``serving``,
    #: ``serving-2``... and ``router``; ``LLMOPS_SERVING_ADDRESS`` of later parts is the router).
    serving_replicas: int = 1
    #: Extra LLMOPS_* settings of single serving replicas, by part name (e.g. ``{"serving-3":
    #: {"LLMOPS_SERVING_FAULTS__TTFT_DELAY_MS": "1000"}}``: the demo's deliberately worse replica).
    replica_env: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    #: Seconds without traffic after which the scaler stops serving replicas (the router holds
    #: requests meanwhile and the scaler starts them again; :mod:`llmops.stack.scaler`). None: off.
    #: Puts the router in front of serving even with one replica; needs a start-up model.
    scale_to_zero_after: float | None = None
    #: Serving pools, name -> replicas (``{"champion": 2, "challenger": 1}``): each pool's replicas
    #: serve ``<pool_model>@<pool>`` and roll together when it moves (:mod:`llmops.stack.fleet`);
    #: they replace ``serving_replicas`` and put the router in front.
    pools: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: The registry model the pools serve; empty: the name in ``LLMOPS_SERVING_MODEL`` of ``env``.
    pool_model: str = ""


def options_from_settings(settings: Any, *, free_ports: bool = False, **fields: Any) -> StackOptions:
    """Options with the settings' data folder and ports (or free ports for everything)."""
    ports = (
        {}
        if free_ports
        else {s: (settings.section(s).port, settings.section(s).metrics_port) for s in SERVICES}
    )
    http = 0 if free_ports else settings.serving.http_port
    return StackOptions(data_dir=settings.data_dir, ports=ports, http_port=http, **fields)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_state(data_dir: Path) -> StackState | None:
    try:
        return StackState.from_json((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_state(data_dir: Path) -> StackState | None:
    """The recorded stack if any of its processes still lives."""
    state = read_state(data_dir)
    if state is not None and any(alive(p.pid) for p in state.parts):
        return state
    return None


class LocalStack:
    """Starts and stops the stack described by :class:`StackOptions`."""

    def __init__(self, options: StackOptions, progress: Callable[[str], None] = lambda _: None) -> None:
        self.options = options
        self.data_dir = options.data_dir.expanduser().absolute()
        self._progress = progress
        self._parts: list[Part] = []
        self._launches: dict[str, tuple[list[str], dict[str, str]]] = {}  # serving parts: command, env

    # up --------------------------------------------------------------------------------------------

    def up(self) -> StackState:
        """Start everything; on any failure stop what was started and raise :class:`StackError`."""
        if (found := running_state(self.data_dir)) is not None:
            raise StackError(
                f"a stack already runs from {self.data_dir} (started {time.ctime(found.started_at)}); "
                "`llmops status` shows it, `llmops down` stops it"
            )
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            env = self._start_redis()
            env["LLMOPS_QUANTIZATION_USE_REGISTRY"] = "true"  # one registry holds every version
            for service in self.options.services:
                if service == "serving" and (
                    self.options.serving_replicas > 1
                    or self.options.scale_to_zero_after is not None
                    or self.options.pools
                ):
                    env.update(self._start_fleet(env))
                else:
                    env.update(self._start_service(service, env))
            if self.options.scale_to_zero_after is not None and self._launches:
                self._start_scaler(self.options.scale_to_zero_after)
            if self.options.prometheus and shutil.which("prometheus"):
                self._start_prometheus()
            if self.options.mlflow_ui:
                self._start_mlflow_ui()
        except BaseException:
            self._stop_parts(self._parts)
            (self.data_dir / STATE_FILE).unlink(missing_ok=True)
            raise
        return self._save()

    def _save(self) -> StackState:
        state = StackState(str(self.data_dir), time.time(), self._parts)
        (self.data_dir / STATE_FILE).write_text(state.to_json())
        return state

    def _spawn(
        self, name: str, args: Sequence[str], env: Mapping[str, str]
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.data_dir / "logs" / f"{name}.log"
        handle = log.open("ab")
        tied = not self.options.detached
        process = popen(
            args,
            tied=tied,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=os.getcwd(),
            start_new_session=True,  # its own process group, which `down` signals
        )
        handle.close()
        if tied:  # what the part starts (its group) goes too when we die
            watch(process.pid, group=True)
        return process, log

    def _start_redis(self) -> dict[str, str]:
        executable = shutil.which("redis-server")
        if executable is None:
            raise StackError("redis-server is not installed (make setup installs it)")
        port = free_port()
        folder = self.data_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        self._progress(f"redis on 127.0.0.1:{port}")
        args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(folder), "--daemonize", "no"]  # fmt: skip
        process, log = self._spawn("redis", args, {})
        self._parts.append(Part("redis", process.pid, address=f"127.0.0.1:{port}", log=str(log)))
        from llmops.cache.redis_server import ping

        self._wait(lambda: ping(port), process, "redis", log)
        return {"LLMOPS_REDIS_URL": f"redis://127.0.0.1:{port}/0"}

    def _start_fleet(self, env: dict[str, str]) -> dict[str, str]:
        """N serving replicas, then the router in front of them (it follows the registry's alias weights)."""
        from llmops.stack.fleet import pool_model_name, serving_parts

        addresses = []
        pools, model = self.options.pools, ""
        if pools:
            model = pool_model_name(self.options.env.get("LLMOPS_SERVING_MODEL"), self.options.pool_model)
        for name, extra in serving_parts(self.options.serving_replicas, pools, model, free_port):
            extra.update(self.options.replica_env.get(name, {}))
            addresses.append(
                self._start_service("serving", {**env, **extra}, name=name)["LLMOPS_SERVING_ADDRESS"]
            )
        router_env = {
            **env,
            "LLMOPS_ROUTER_ENDPOINTS": ",".join(addresses),
            "LLMOPS_ROUTER_TRAFFIC_SPLIT": "true" if "registry" in self.options.services else "false",
            # the rollout controller steps the registry's rollouts on this router's SLIs
            "LLMOPS_ROUTER_ROLLOUT_CONTROLLER": env.get(
                "LLMOPS_ROUTER_ROLLOUT_CONTROLLER", "true" if "registry" in self.options.services else "false"
            ),
            "LLMOPS_ROUTER_HTTP_PORT": str(free_port()),
        }
        router = self._start_service("router", router_env)
        return {"LLMOPS_SERVING_ADDRESS": router["LLMOPS_ROUTER_ADDRESS"], **router}

    def _start_service(self, service: str, env: dict[str, str], name: str = "") -> dict[str, str]:
        name = name or service
        upper = service.upper()
        grpc_port, metrics_port = self.options.ports.get(name, (0, 0))
        child_env = {
            "LLMOPS_DATA_DIR": str(self.data_dir),
            "LLMOPS_HOST": "127.0.0.1",
            f"LLMOPS_{upper}_PORT": str(grpc_port),
            f"LLMOPS_{upper}_METRICS_PORT": str(metrics_port),
            **env,
            **self.options.env,
        }
        if service == "serving":
            child_env.setdefault("LLMOPS_SERVING_HTTP_PORT", str(self.options.http_port or free_port()))
        self._progress(f"{name} starting")
        args = [sys.executable, "-m", "llmops.cli", "serve", service]
        process, log = self._spawn(name, args, child_env)
        part = Part(name, process.pid, log=str(log))
        self._parts.append(part)
        ports: list[tuple[str, str]] = []

        def listening() -> bool:
            if not ports:
                match = _LISTENING.search(log.read_text(errors="replace"))
                if match is None:
                    return False
                ports.append((match.group(2), match.group(3)))
            # Readiness (its store migrated, its dependencies reachable) before the next one starts;
            # serving is ready only with a model, which comes later: liveness for it.
            return _serving(f"127.0.0.1:{ports[0][0]}", "" if service == "serving" else _GRPC_NAMES[service])

        self._wait(listening, process, service, log)
        part.address = f"127.0.0.1:{ports[0][0]}"
        part.metrics = f"http://127.0.0.1:{ports[0][1]}/metrics"
        if service in ("serving", "router"):
            part.url = f"http://127.0.0.1:{child_env[f'LLMOPS_{upper}_HTTP_PORT']}/v1"
        if service == "serving":  # how the scaler starts it again: the same ports
            fixed = {f"LLMOPS_{upper}_PORT": ports[0][0], f"LLMOPS_{upper}_METRICS_PORT": ports[0][1]}
            self._launches[name] = (args, {**child_env, **fixed})
        self._progress(f"{name} ready on {part.address}")
        return {f"LLMOPS_{upper}_ADDRESS": part.address}

    def _start_scaler(self, idle_seconds: float) -> None:
        """The scale-to-zero loop over the serving replicas, reading the router's metrics."""
        from llmops.stack.scaler import CONFIG_FILE, ReplicaLaunch, ScalerConfig

        router = next(p for p in self._parts if p.name == "router")
        replicas = [
            ReplicaLaunch(part.name, part.address, *self._launches[part.name], log=part.log)
            for part in self._parts
            if part.name in self._launches
        ]
        config = ScalerConfig(
            str(self.data_dir), router.metrics, idle_seconds, replicas,
            grace_seconds=self.options.grace_seconds, detached=self.options.detached,
        )  # fmt: skip
        path = config.write(self.data_dir / CONFIG_FILE)
        process, log = self._spawn("scaler", [sys.executable, "-m", "llmops.stack.scaler", str(path)], {})
        self._parts.append(Part("scaler", process.pid, log=str(log)))
        self._progress(f"scaler stops serving after {idle_seconds:g} s idle")

    def _start_prometheus(self) -> None:
        port = free_port()
        folder = self.data_dir / "prometheus"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        rule_files = []
        if RULES.is_file():  # the chart's recording rules and alerts, evaluated at the scrape cadence
            rules = folder / "rules.yaml"
            rules.write_text(local_rules(RULES, self.options.scrape_interval))
            rule_files.append(rules)
        scraped = [p for p in self._parts if p.metrics]
        config.write_text(prometheus_config(scraped, self.options.scrape_interval, rule_files))
        args = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"]  # fmt: skip
        process, log = self._spawn("prometheus", args, {})
        self._parts.append(Part("prometheus", process.pid, url=f"http://127.0.0.1:{port}", log=str(log)))
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{port}/-/ready"), process, "prometheus", log)
        self._progress(f"prometheus on http://127.0.0.1:{port}")

    def _start_mlflow_ui(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        if not mlflow.is_file():
            return
        port = free_port()
        store = f"sqlite:///{self.data_dir / 'mlflow.db'}"
        args = [str(mlflow), "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1"]  # fmt: skip
        process, log = self._spawn("mlflow-ui", args, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self._parts.append(Part("mlflow-ui", process.pid, url=f"http://127.0.0.1:{port}", log=str(log)))
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{port}/health"), process, "mlflow-ui", log)
        self._progress(f"MLflow UI on http://127.0.0.1:{port}")

    def _wait(
        self, ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str, log: Path
    ) -> None:
        deadline = time.monotonic() + self.options.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StackError(f"{name} exited with code {process.returncode}: {_tail(log)}")
            if ready():
                return
            time.sleep(0.1)
        raise StackError(f"{name} was not ready within {self.options.start_timeout:.0f} s: {_tail(log)}")

    # down ------------------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop the recorded stack; returns the names of the parts stopped."""
        state = read_state(self.data_dir)
        if state is None:
            return []
        stopped = [p.name for p in state.parts if alive(p.pid)]
        self._stop_parts(state.parts)
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        return stopped

    def _stop_parts(self, parts: Sequence[Part]) -> None:
        """SIGTERM in reverse start order (each drains), then SIGKILL what outlives the grace."""
        for part in reversed(parts):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(part.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.options.grace_seconds
            while alive(part.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(part.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(part.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(part.pid, os.WNOHANG)
            forget(part.pid)


def status(state: StackState) -> list[dict[str, Any]]:
    """Each part: name, pid, whether its process lives, where it is, whether it answers."""
    rows = []
    for part in state.parts:
        running = alive(part.pid)
        if not running:
            health = "stopped"
        elif part.address and (
            part.name in SERVICES or part.name == "router" or part.name.startswith("serving-")
        ):
            health = "SERVING" if _serving(part.address) else "NOT_SERVING"
        elif part.name == "redis":
            from llmops.cache.redis_server import ping

            health = "PONG" if ping(int(part.address.rsplit(":", 1)[1])) else "no answer"
        elif part.url:
            health = "ok" if _http_ok(part.url) else "no answer"
        else:
            health = "running"
        rows.append({**dataclasses.asdict(part), "alive": running, "health": health})
    return rows


def prometheus_config(parts: Sequence[Part], interval: str = "5s", rule_files: Sequence[Path] = ()) -> str:
    """Scrape every service's /metrics every ``interval``, labelled like the chart's ServiceMonitor.

    The job is the component (``job="serving"``), ``honor_labels`` keeps the services' own
    ``service`` label (the gRPC service name), and ``namespace``/``pod`` stand in for what Kubernetes
    service discovery adds; so the chart's rules and dashboards read the embedded stack unchanged.
    """
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": part.name,
                "honor_labels": True,
                "static_configs": [
                    {
                        "targets": [part.metrics.removeprefix("http://").removesuffix("/metrics")],
                        "labels": {"namespace": "local", "pod": f"{part.name}-0"},
                    }
                ],
            }
            for part in parts
        ],
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML


def _serving(address: str, service: str = "") -> bool:
    """Whether grpc.health.v1 reports SERVING: liveness for ``""``, readiness for a service's name."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(200 <= response.status < 300)
    except OSError:
        return False


def _tail(log: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    return "no log"
