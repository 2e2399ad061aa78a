"""A two-node Ray cluster on this machine for data-parallel training runs (benchmarks and tests).

``ray start`` twice: a head and a worker node of ``cpus`` CPUs each, with separate temp folders and
TMPDIRs (where ranks keep their scratch checkpoints), so the nodes share nothing but the folders a
job is configured to share (the job store and Ray Train's checkpoint storage). Stopping kills this
cluster's processes only, found by their temp folders (``ray stop`` would stop every Ray runtime
of the user on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ray_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return {**env, **extra}


@dataclass
class RayCluster:
    address: str
    #: Each node's temp folder: the head's, then the worker node's.
    temps: tuple[Path, Path]

    def node_of(self, pid: int) -> int:
        """Which node (0 head, 1 worker) runs process ``pid``: the temp folder of its raylet."""
        for parent in psutil.Process(pid).parents():
            command = " ".join(parent.cmdline())
            for index, temp in enumerate(self.temps):
                if "raylet" in command and str(temp) in command:
                    return index
        raise LookupError(f"process {pid} runs under no raylet of this cluster")


def start_cluster(cpus: int = 1, **env: str) -> RayCluster:
    """``env``: extra environment of every Ray process (Ray's own ``RAY_*`` knobs)."""
    root = Path(tempfile.mkdtemp(prefix="llmops-ddp-", dir="/tmp"))  # short: Ray's socket paths
    head, node = root / "h", root / "n"
    for temp in (head, node):
        (temp / "tmp").mkdir(parents=True)
    port = free_port()
    common = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    cluster = RayCluster(f"127.0.0.1:{port}", (head, node))
    head_args = [f"--port={port}", "--include-dashboard=false", '--system-config={"worker_niceness": 0}']
    try:
        subprocess.run(
            [BIN / "ray", "start", "--head", f"--temp-dir={head}", *head_args, *common],
            check=True,
            capture_output=True,
            env=ray_env(TMPDIR=str(head / "tmp"), **env),
            timeout=180,
        )
        subprocess.run(
            [BIN / "ray", "start", f"--address={cluster.address}", f"--temp-dir={node}", *common],
            check=True,
            capture_output=True,
            env=ray_env(TMPDIR=str(node / "tmp"), **env),
            timeout=180,
        )
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: RayCluster) -> None:
    """Stop this cluster's processes and their children, then remove its folders."""
    marks = [str(temp) for temp in cluster.temps]
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = " ".join(process.info["cmdline"] or [])
            if any(mark in command for mark in marks):
                found[process.pid] = process
                found.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.Error:
            continue
    for process in found.values():
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(found.values()), timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    shutil.rmtree(cluster.temps[0].parent, ignore_errors=True)
