"""Podman plumbing for `make kube-smoke`: one network, pods played from the chart's render, cleanup.

Podman 4.3 publishes every containerPort on the host (as if it were a hostPort), so two pods that
listen on the same port (every llmops service on 50051) cannot both start, and the published ports
would capture the host's own traffic to those ports. Kubernetes publishes nothing. Without touching
the manifests, this session:
  - runs each `podman kube play` in a throwaway network namespace (`unshare --net`): podman's port
    reservations land there, one namespace per pod, and clash with nothing;
  - hands podman a netavark wrapper (through a containers.conf of its own, based on the project's
    docker/containers.conf) that runs the real netavark in the host's network namespace, so every
    pod joins the one bridge network with its Services' names as DNS aliases, and that drops the
    port mappings before netavark sees them: no DNAT rules on the host, as in Kubernetes.
Everything it creates (pods, their volumes, the network) is removed by `close()`, also on errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROJECT_CONF = ROOT / "docker" / "containers.conf"
HELPER_DIRS = ["/usr/local/libexec/podman", "/usr/local/lib/podman", "/usr/libexec/podman", "/usr/lib/podman"]
NETWORK = "llmops-smoke"


def find_netavark() -> str:
    for folder in HELPER_DIRS:
        path = Path(folder) / "netavark"
        if path.exists():
            return str(path)
    raise RuntimeError("netavark not found (podman's network backend): install podman from apt")


WRAPPER = """\
#!{python}
# netavark for `make kube-smoke` (written by scripts/kube_smoke_podman.py): runs the real netavark in
# the host's network namespace and drops port mappings (Kubernetes publishes no containerPort).
import json, subprocess, sys
args = sys.argv[1:]
data = b""
if any(a in ("setup", "teardown") for a in args):
    data = sys.stdin.buffer.read()
    try:
        options = json.loads(data)
        options["port_mappings"] = None
        data = json.dumps(options).encode()
    except ValueError:
        pass
cmd = ["nsenter", "--net={host_netns}", "{netavark}", *args]
sys.exit(subprocess.run(cmd, input=data).returncode)
"""


class PodmanSession:
    """Pods on one podman network, each played from its own YAML; `close()` removes them all."""

    def __init__(self, network: str | None = None) -> None:
        # One network per run: two runs at once never remove each other's.
        self.network = network or f"{NETWORK}-{os.getpid()}"
        self.tmp = Path(tempfile.mkdtemp(prefix="llmops-kube-smoke-"))
        self.pods: list[str] = []
        self.volumes_before: set[str] = set()
        helpers = self.tmp / "helpers"
        helpers.mkdir()
        wrapper = helpers / "netavark"
        wrapper.write_text(
            WRAPPER.format(
                python=shutil.which("python3") or "/usr/bin/python3",
                host_netns=f"/proc/{os.getpid()}/ns/net",
                netavark=find_netavark(),
            )
        )
        wrapper.chmod(0o755)
        aardvark = next(
            (Path(d) / "aardvark-dns" for d in HELPER_DIRS if (Path(d) / "aardvark-dns").exists()), None
        )
        if aardvark is not None:
            (helpers / "aardvark-dns").symlink_to(aardvark)
        conf = PROJECT_CONF.read_text()
        dirs = json.dumps([str(helpers), *HELPER_DIRS])
        conf = conf.replace("[engine]\n", f"[engine]\nhelper_binaries_dir = {dirs}\n", 1)
        conf += textwrap.dedent(
            """
            [network]
            network_backend = "netavark"
            """
        )
        (self.tmp / "containers.conf").write_text(conf)
        self.env = dict(os.environ, CONTAINERS_CONF=str(self.tmp / "containers.conf"))

    def podman(self, *args: str, check: bool = True, timeout: float | None = 120, netns: bool = False) -> str:
        cmd = ["podman", *args]
        if netns:
            cmd = ["unshare", "--net", *cmd]
        result = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-1500:]}"
            )
        return result.stdout

    def start(self) -> None:
        self.volumes_before = set(self.podman("volume", "ls", "--format", "{{.Name}}").split())
        self.podman("network", "rm", "-f", self.network, check=False)
        self.podman("network", "create", self.network)

    def play(self, name: str, manifest: str, aliases: list[str]) -> list[str]:
        """Plays one workload's YAML in its own network namespace; returns the pods it made."""
        path = self.tmp / f"{name}.yaml"
        path.write_text(manifest)
        network = self.network + (":" + ",".join(f"alias={a}" for a in aliases) if aliases else "")
        before = set(self.pod_names())
        try:
            self.podman("kube", "play", "--network", network, str(path), netns=True, timeout=300)
        finally:
            made = [p for p in self.pod_names() if p not in before]
            self.pods += made
        return made

    def pod_names(self) -> list[str]:
        return self.podman("pod", "ps", "--format", "{{.Name}}").split()

    def containers(self, pod: str) -> list[str]:
        """The pod's containers, without its infra container."""
        data: dict[str, Any] = json.loads(self.podman("pod", "inspect", pod))
        if isinstance(data, list):
            data = data[0]
        return [c["Name"] for c in data.get("Containers", []) if not c["Name"].endswith("-infra")]

    def inspect(self, container: str) -> dict[str, Any]:
        data = json.loads(self.podman("container", "inspect", container))
        result: dict[str, Any] = data[0]
        return result

    def ip(self, container: str) -> str:
        networks = self.inspect(container)["NetworkSettings"]["Networks"]
        return str(networks[self.network]["IPAddress"])

    def logs(self, container: str, tail: int = 40) -> str:
        result = subprocess.run(
            ["podman", "logs", "--tail", str(tail), container], env=self.env, capture_output=True, text=True
        )
        return result.stdout + result.stderr

    def image_size(self, image: str) -> int:
        return int(self.podman("image", "inspect", "--format", "{{.Size}}", image).strip())

    def close(self) -> list[str]:
        """Removes every pod, volume and the network this session made; returns what failed."""
        problems = []
        for pod in reversed(self.pods):
            try:
                self.podman("pod", "rm", "-f", "-t", "0", pod, timeout=120)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                problems.append(f"pod {pod}: {exc}")
        try:
            volumes = set(self.podman("volume", "ls", "--format", "{{.Name}}").split())
            for volume in sorted(volumes - self.volumes_before):
                self.podman("volume", "rm", "-f", volume, check=False)
            self.podman("network", "rm", "-f", self.network, check=False)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems
