"""`make kube-smoke`: the chart's rendered workloads, unmodified, as real containers under podman.

Renders charts/llmops with ci/local-values.yaml (local images, the tiny model, CPU), plays every
Deployment and StatefulSet with `podman kube play` on one network (each Service's name a DNS alias
of the pods it selects), and checks from the host:
  - each pod passes its own probes (run by this harness: podman runs none) within the start-up
    budget the probes give it (periodSeconds x failureThreshold); time to SERVING is printed;
  - a model is registered (the tiny Llama, alias champion), serving loads it by alias, a streamed
    generate answers, and the same request again is a response-cache hit (Redis);
  - every serving pool (champion, challenger) answers by its alias on its own pods and through a
    router on the host over all of them (static discovery: the chart's router reads EndpointSlices);
  - MLflow answers and holds the registered model;
  - an alias move rolls the champion pool under load, and a rollout promotes between the pools'
    pods (scripts/kube_smoke_fleet.py; the host router splits by alias weights and runs the
    rollout controller, as the chart's router does with rollouts on);
  - SIGTERM to serving while a stream is open: the stream finishes and the container exits within
    the pod's terminationGracePeriodSeconds.
Workarounds for what podman cannot do are listed (scripts/kube_smoke_manifest.py); one that touches
a container's args, env, ports or volumes fails the run. Everything started is removed at the end,
also on failure or Ctrl-C.

Usage: python scripts/kube_smoke.py [--values FILE ...] [--keep-going]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kube_smoke_fleet as kf
import kube_smoke_manifest as km
import kube_smoke_router as kr
from kube_smoke_podman import PodmanSession

ROOT = km.ROOT
LLMOPS = str(ROOT / ".venv" / "bin" / "llmops")
MODEL_NAME = "tiny"
# Pod names are global to podman: one run at a time.
LOCK_FILE = "/tmp/llmops-kube-smoke.lock"
console = Console()


FIRST_WAVE = ("redis", "mlflow")


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"].get("labels", {}).get("app.kubernetes.io/component", ""))


class SmokeFailure(RuntimeError):
    """A check failed."""


def probe_once(
    session: PodmanSession, container: str, spec: dict[str, Any], ip: str, ports: dict[str, int]
) -> bool:
    """Runs one Kubernetes probe the way the kubelet would, against the container; True when it passes.

    ``ports`` maps the container's port names to numbers (probes may name a port)."""
    timeout = float(spec.get("timeoutSeconds", 1))

    def port(value: int | str) -> int:
        return int(ports[value]) if isinstance(value, str) else int(value)

    try:
        if "grpc" in spec:
            with grpc.insecure_channel(f"{ip}:{port(spec['grpc']['port'])}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")),
                    timeout=max(timeout, 1),
                )
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        if "httpGet" in spec:
            get = spec["httpGet"]
            url = f"http://{ip}:{port(get['port'])}{get.get('path', '/')}"
            with urllib.request.urlopen(url, timeout=max(timeout, 1)) as response:
                return 200 <= int(response.status) < 400
        if "tcpSocket" in spec:
            import socket

            with socket.create_connection((ip, port(spec["tcpSocket"]["port"])), timeout=max(timeout, 1)):
                return True
        if "exec" in spec:
            result = subprocess.run(
                ["podman", "exec", container, *spec["exec"]["command"]],
                env=session.env,
                capture_output=True,
                timeout=max(timeout, 5),
            )
            return result.returncode == 0
    except (grpc.RpcError, OSError, subprocess.TimeoutExpired, KeyError):
        return False
    raise SmokeFailure(f"unknown probe kind: {sorted(spec)}")


def wait_ready(
    session: PodmanSession, pod: str, template: dict[str, Any], started: float, scale: float = 1.0
) -> float:
    """Waits until the pod's container passes its start-up then readiness probe; returns seconds taken.

    The deadline is the probes' start-up budget times ``scale`` (a slow or shared machine)."""
    container_spec = template["spec"]["containers"][0]
    container = session.containers(pod)[0]
    budget = km.startup_budget(container_spec) * scale
    probes = [container_spec[p] for p in ("startupProbe", "readinessProbe") if p in container_spec]
    ip = session.ip(container)
    ports = {p["name"]: int(p["containerPort"]) for p in container_spec.get("ports", []) if "name" in p}
    deadline = started + budget
    for spec in probes:
        while not probe_once(session, container, spec, ip, ports):
            state = session.inspect(container)["State"]
            if time.monotonic() > deadline:
                raise SmokeFailure(
                    f"{pod}: not ready within its start-up budget of {budget:.0f} s "
                    f"(state {state.get('Status')}, restarts {state.get('RestartCount', 0)})\n{session.logs(container)}"
                )
            time.sleep(0.5)
    return time.monotonic() - started


def register_model(registry: str, alias: str = "champion") -> str:
    """Builds (or reuses) the tiny model and registers it as a new version with ``alias``; returns name:version."""
    path = (
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "llmops.common.tiny_model", "--no-progress"],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    out = subprocess.run(
        [
            LLMOPS,
            "models",
            "register",
            MODEL_NAME,
            path,
            "--alias",
            alias,
            "--address",
            registry,
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise SmokeFailure(f"register failed: {out.stderr.strip()[-1500:]}")
    data = json.loads(out.stdout)
    version = data.get("version", data.get("model_version", {}).get("version", "?"))
    return f"{MODEL_NAME}:{version}"


def stream(
    address: str, max_tokens: int, on_first: Callable[[], None] | None = None, alias: str = "champion"
) -> tuple[str, bool, str]:
    """One streamed greedy generate by alias; returns (text, cached, resolved name:version@alias)."""
    from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2
    from llmops.proto.serving.v1 import serving_service_pb2, serving_service_pb2_grpc

    request = serving_service_pb2.GenerateStreamRequest(
        model=serving_service_pb2.ModelSelector(model_ref=model_pb2.ModelRef(name=MODEL_NAME, alias=alias)),
        prompt=generation_pb2.Prompt(text="def main():"),
        sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=max_tokens, ignore_eos=True),
    )
    text, cached, resolved, first = [], False, "", True
    with grpc.insecure_channel(address) as channel:
        for message in serving_service_pb2_grpc.ServingServiceStub(channel).GenerateStream(
            request, timeout=300
        ):
            cached = message.cached
            if message.HasField("delta"):
                text.append(message.delta.text_delta)
                if first and on_first is not None:
                    on_first()
                first = False
            if message.HasField("end"):
                m = message.end.model
                resolved = f"{m.name}:{m.version}@{m.alias}"
    return "".join(text), cached, resolved


def alias_of(workload: dict[str, Any], configmaps: list[dict[str, Any]]) -> str:
    """The alias a serving workload's pods follow, from the LLMOPS_SERVING_MODEL the chart gives them."""
    env = km.container_env(km.pod_spec(workload)["containers"][0], configmaps)
    reference = env.get("LLMOPS_SERVING_MODEL", "")
    if "@" not in reference:
        raise SmokeFailure(f"{km.name_of(workload)} serves {reference!r}, not a model by alias")
    return reference.split("@", 1)[1]


def check_pools(addresses: dict[str, str], versions: dict[str, str], router: str) -> None:
    """Every pool answers by its alias, on its own pods and through the router over all of them."""
    for address, alias in addresses.items():
        text, _, resolved = stream(address, 8, alias=alias)
        if not text or not resolved.startswith(f"{versions[alias]}@{alias}"):
            raise SmokeFailure(f"{alias} pool at {address}: resolved={resolved!r} text={text!r}")
    console.print(f"[green]ok[/]  every pool answers by its alias: {sorted(addresses.values())}")
    for alias in sorted(set(addresses.values())):
        text, _, resolved = stream(router, 8, alias=alias)
        if not text or not resolved.startswith(f"{versions[alias]}@{alias}"):
            raise SmokeFailure(f"through the router, {MODEL_NAME}@{alias}: resolved={resolved!r}")
        console.print(f"[green]ok[/]  through the router: {MODEL_NAME}@{alias} answered by {resolved}")


def check_fleet(registry: str, router: str, pods: dict[str, str], versions: dict[str, str]) -> dict[str, Any]:
    """The alias move under load, then a rollout to a third version (scripts/kube_smoke_fleet.py)."""
    say = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
    numbers = {alias: int(version.split(":")[1]) for alias, version in versions.items()}
    metrics = {pool: f"http://{address.rsplit(':', 1)[0]}:9090/metrics" for pool, address in pods.items()}
    with console.status("alias move: champion -> the challenger's version, under load through the router"):
        moved = asyncio.run(kf.alias_move(registry, router, pods, metrics, numbers, say))
    console.print(
        f"[green]ok[/]  alias move rolled the champion pool in {moved['seconds']:.1f} s, no request failed"
    )
    with console.status("registering a third version (alias challenger) for the rollout"):
        third = register_model(registry, "challenger")
    console.print(f"[green]ok[/]  registered {third} as {MODEL_NAME}@challenger")
    with console.status(f"rollout to {third} through the router (its controller steps it)"):
        done = asyncio.run(kf.rollout(registry, router, pods, int(third.split(":")[1]), say))
    console.print(f"[green]ok[/]  rollout {done['id']} promoted {third} between the pools' pods")
    return {"alias_move": moved, "rollout": done}


def check_weights_path(registry: str) -> dict[str, float]:
    """No serving pod read weights through the registry process (the chart's shared claim serves them).

    The registry's own call counts, after every load and reload above: serving pods asked it where a
    version's files are (GetArtifactLocations) and never for the bytes (DownloadArtifact).
    """
    url = f"http://{registry.rsplit(':', 1)[0]}:9090/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    calls = {method: 0.0 for method in ("GetArtifactLocations", "DownloadArtifact")}
    for method, value in re.findall(
        r'llmops_grpc_server_handled_total\{[^}]*method="(\w+)"[^}]*\} ([0-9.e+-]+)', text
    ):
        if method in calls:
            calls[method] += float(value)
    if calls["DownloadArtifact"] or not calls["GetArtifactLocations"]:
        raise SmokeFailure(f"serving's weights went through the registry process: its calls {calls}")
    console.print(
        f"[green]ok[/]  weights read from the shared claim: the registry answered "
        f"{calls['GetArtifactLocations']:.0f} GetArtifactLocations and no DownloadArtifact"
    )
    return calls


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the harness.

    A BaseException, as KeyboardInterrupt is: a library's ``except Exception`` around a probe (or a
    callback in a running event loop) must not swallow it and leave the harness waiting out a budget.
    """


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-scale",
        type=float,
        default=float(os.environ.get("KUBE_SMOKE_BUDGET_SCALE", "1")),
        help="wait up to this many times each pod's start-up budget (a busy machine); over-budget pods are flagged",
    )
    parser.add_argument(
        "--values", action="append", type=Path, help="values files (default ci/local-values.yaml)"
    )
    args = parser.parse_args()
    lock = os.open(LOCK_FILE, os.O_CREAT | os.O_WRONLY, 0o644)  # held until the process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        console.print(f"[red]another kube-smoke is running (lock {LOCK_FILE})[/]")
        return 1
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()
    docs = km.render(args.values)
    pairs, workarounds = km.plan(docs)  # raises GuardError before anything runs
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    images = sorted({c["image"] for _, w in pairs for c in km.pod_spec(w)["containers"]})

    table = Table(title="workarounds (podman falls short; args, env, ports and volumes unchanged: guarded)")
    for column in ("workload", "change", "why"):
        table.add_column(column)
    table.add_row(
        "every pod",
        "`kube play` in its own network namespace; port mappings dropped",
        "podman 4.3 publishes every containerPort on the host (clashes between pods)",
    )
    table.add_row(
        "every pod",
        "started in waves: Redis and MLflow, then the services, then serving (after a model is registered)",
        "all at once on 2 cores, imports outlast the 120 s start-up budgets (a kubelet would restart them)",
    )
    table.add_row(
        "every pod",
        "emptyDir volumes are shared between pods by name (not worked around)",
        "podman names the volume after the pod's volume name",
    )
    for w in workarounds:
        table.add_row(w.workload, w.change, w.reason)
    console.print(table)
    for kind, names in km.skipped(docs).items():
        console.print(
            f"[dim]not played: {kind} {', '.join(names)} ({km.NOT_PLAYED.get(kind, 'not a workload')})[/]"
        )

    session = PodmanSession()
    router_process: subprocess.Popen[bytes] | None = None
    router_log = Path(os.environ.get("TMPDIR", "/tmp")) / f"llmops-kube-smoke-router-{os.getpid()}.log"
    fleet: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    times: dict[str, tuple[float, float]] = {}
    failed = False
    try:
        for image in images:
            if subprocess.run(["podman", "image", "exists", image], env=session.env).returncode != 0:
                raise SmokeFailure(f"image {image} missing: run `make image`")
            sizes[image] = session.image_size(image)
        session.start()
        serving = [(o, p) for o, p in pairs if component(o) == "serving"]
        others = [(o, p) for o, p in pairs if (o, p) not in serving]
        pods_of: dict[str, list[str]] = {}
        starts: dict[str, float] = {}

        def play(original: dict[str, Any], played: dict[str, Any], with_claims: bool) -> None:
            name = km.name_of(original)
            aliases = km.service_aliases(docs, original)
            starts[name] = time.monotonic()
            pods_of[name] = []
            for index, replica in enumerate(km.replicas_of(played)):
                manifest = km.dump([*configmaps, *(claims if with_claims and index == 0 else []), replica])
                with console.status(
                    f"podman kube play {km.name_of(replica)} (aliases {', '.join(aliases) or '-'})"
                ):
                    pods_of[name] += session.play(km.name_of(replica), manifest, aliases)

        def wait(originals: list[dict[str, Any]]) -> None:
            """Polls every pod of these workloads at once: each one's time counts from its own start."""
            jobs = {}
            with ThreadPoolExecutor(max_workers=8) as pool:
                for original in originals:
                    name = km.name_of(original)
                    template = original["spec"]["template"]
                    for pod in pods_of[name]:
                        future = pool.submit(
                            wait_ready, session, pod, template, starts[name], args.budget_scale
                        )
                        jobs[future] = (pod, km.startup_budget(km.pod_spec(original)["containers"][0]))
                with console.status(f"waiting for the probes of {', '.join(p for p, _ in jobs.values())}"):
                    for future in as_completed(jobs):
                        pod, budget = jobs[future]
                        took = future.result()
                        times[pod] = (took, budget)
                        over = " [yellow]OVER the unscaled budget[/]" if took > budget else ""
                        console.print(
                            f"[green]ok[/]  {pod} ready in {took:.1f} s (budget {budget:.0f} s){over}"
                        )

        # Stores first, then the services that need them: started all at once on a 2-core machine,
        # their imports alone outlast the 120 s start-up budgets (a kubelet would restart them).
        stores = [(o, p) for o, p in others if component(o) in FIRST_WAVE]
        for wave in (stores, [pair for pair in others if pair not in stores]):
            for original, played in wave:
                play(original, played, with_claims=not pods_of)
            wait([original for original, _ in wave])

        registry_pod = pods_of[next(km.name_of(o) for o, _ in others if km.name_of(o).endswith("-registry"))][
            0
        ]
        registry = f"{session.ip(session.containers(registry_pod)[0])}:50051"
        # Each serving pool follows an alias (its pods' LLMOPS_SERVING_MODEL): one version per alias.
        aliases = {name: alias_of(o, configmaps) for name, o in ((km.name_of(o), o) for o, _ in serving)}
        versions: dict[str, str] = {}
        for alias in sorted(set(aliases.values()), key=lambda a: a != "champion"):
            with console.status(f"registering the tiny model (alias {alias}) through the registry pod"):
                versions[alias] = register_model(registry, alias)
            console.print(f"[green]ok[/]  registered {versions[alias]} as {MODEL_NAME}@{alias} at {registry}")
        version = versions["champion"]

        for original, played in serving:
            play(original, played, with_claims=False)
        wait([original for original, _ in serving])
        serving_original = next(o for o, _ in serving if aliases[km.name_of(o)] == "champion")
        serving_pod = pods_of[km.name_of(serving_original)][0]
        serving_ctr = session.containers(serving_pod)[0]
        address = f"{session.ip(serving_ctr)}:50051"
        pool_addresses = {
            f"{session.ip(session.containers(pod)[0])}:50051": aliases[km.name_of(o)]
            for o, _ in serving
            for pod in pods_of[km.name_of(o)]
        }

        text, cached, resolved = stream(address, 16)
        if cached or not text or not resolved.startswith(f"{version}@champion"):
            raise SmokeFailure(f"first stream: cached={cached} resolved={resolved!r} text={text!r}")
        console.print(f"[green]ok[/]  streamed generate by alias: {resolved}, {len(text)} characters")
        again, cached, _ = stream(address, 16)
        if not cached or again != text:
            raise SmokeFailure(f"repeated request: cached={cached}, same text={again == text}")
        console.print("[green]ok[/]  repeated request answered from the response cache (Redis)")
        with console.status("a router on the host over every serving pod (static discovery)"):
            router_process, router = kr.start_router(sorted(pool_addresses), router_log, registry)
        check_pools(pool_addresses, versions, router)

        mlflow_pod = pods_of[next(km.name_of(o) for o, _ in others if km.name_of(o).endswith("-mlflow"))][0]
        mlflow = f"http://{session.ip(session.containers(mlflow_pod)[0])}:5000"
        mlflow_name = km.service_aliases(
            docs, next(o for o, _ in others if km.name_of(o).endswith("-mlflow"))
        )[0]
        # As a client in the cluster calls it: by its Service name (MLflow refuses other Host headers).
        search = urllib.request.Request(
            f"{mlflow}/api/2.0/mlflow/registered-models/search", headers={"Host": f"{mlflow_name}:5000"}
        )
        with urllib.request.urlopen(search, timeout=10) as response:
            names = [m["name"] for m in json.load(response).get("registered_models", [])]
        if MODEL_NAME not in names:
            raise SmokeFailure(f"MLflow answers but lists {names}, not {MODEL_NAME}")
        console.print(f"[green]ok[/]  MLflow answers and holds the registered model ({mlflow})")

        pods = {alias: address for address, alias in pool_addresses.items()}
        if len(pods) != len(pool_addresses) or set(pods) != {"champion", "challenger"}:
            raise SmokeFailure(f"the fleet checks want one champion and one challenger pod: {pool_addresses}")
        fleet = check_fleet(registry, router, pods, versions)
        check_weights_path(registry)

        grace = float(km.pod_spec(serving_original).get("terminationGracePeriodSeconds", 30))
        sent: dict[str, float] = {}

        def sigterm() -> None:
            pre_stop = km.pod_spec(serving_original)["containers"][0].get("lifecycle", {}).get("preStop", {})
            sent["at"] = time.monotonic()
            # The kubelet runs preStop, then sends SIGTERM, within one grace period.
            if "exec" in pre_stop:
                subprocess.Popen(
                    [
                        "sh",
                        "-c",
                        f"podman exec {serving_ctr} {' '.join(pre_stop['exec']['command'])}; "
                        f"podman kill --signal TERM {serving_ctr}",
                    ],
                    env=session.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            else:
                session.podman("kill", "--signal", "TERM", serving_ctr)

        pid = session.inspect(serving_ctr)["State"]["Pid"]
        with console.status(f"SIGTERM to {serving_ctr} during a stream (grace {grace:.0f} s)"):
            drained, _, _ = stream(address, 200, on_first=sigterm)
            ended = time.monotonic() - sent["at"]
            while True:
                state = session.inspect(serving_ctr)["State"]
                if state["Pid"] != pid or state["Status"] != "running":
                    break
                if time.monotonic() - sent["at"] > grace:
                    raise SmokeFailure(f"serving still running {grace:.0f} s after SIGTERM")
                time.sleep(0.2)
        exited = time.monotonic() - sent["at"]
        console.print(
            f"[green]ok[/]  SIGTERM: the open stream finished ({len(drained)} characters, {ended:.1f} s "
            f"after preStop began) and serving exited after {exited:.1f} s (grace {grace:.0f} s; the "
            "host router's open watch streams were attached)"
        )
    except (
        SmokeFailure,
        km.GuardError,
        RuntimeError,
        OSError,
        grpc.RpcError,
        subprocess.SubprocessError,
    ) as exc:
        failed = True
        console.print(f"[red]FAIL[/] {exc}")
        if router_process is not None and router_log.exists():
            console.print("the host router's log (last lines):", router_log.read_text()[-3000:], markup=False)
    except Interrupted as exc:
        failed = True
        console.print(f"[yellow]interrupted ({exc})[/]")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if router_process is not None:
            kr.stop_router(router_process)
        router_log.unlink(missing_ok=True)
        with console.status("removing pods, volumes and the network"):
            problems = session.close()
        for problem in problems:
            console.print(f"[red]cleanup[/] {problem}")

    title = "time to SERVING (harness-run probes)"
    if args.budget_scale != 1:
        title += f"; budgets scaled x{args.budget_scale:g} for this machine"
    result = Table(title=title)
    for column in ("pod", "seconds", "budget"):
        result.add_column(column)
    for pod, (took, budget) in times.items():
        result.add_row(pod, f"{took:.1f}", f"{budget:.0f}")
    console.print(result)
    if fleet:
        console.print(kf.summary(fleet), markup=False)
    for image, size in sizes.items():
        console.print(f"image {image}: {size / 1e9:.2f} GB")
    console.print(
        f"kube-smoke {'FAILED' if failed or problems else 'passed'} in {time.monotonic() - t0:.0f} s"
    )
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
