"""The processes of the router benchmark: serving replicas pinned to one core each, and the router.

Each replica is ``llmops serve serving`` under ``taskset -c <core>`` (vLLM's CPU worker binds its
OpenMP threads to the CPUs it is allowed, and the spawned EngineCore inherits the mask), loading
the model folder at start with prefix caching on and a KV cache of a stated size. Every process is
tied to the benchmark (:mod:`llmops.common.process`) and its process group is reaped, so nothing
outlives it. Metrics are read from each process's ``/metrics`` (Prometheus text).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from llmops.common.process import forget, popen, watch

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening grpc=(\d+) metrics=(\d+)")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFaN]+)")


@dataclass
class Process:
    """A started service process: where it listens and where it logs."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""
    metrics_url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # the group's stragglers (vLLM's EngineCore)
            os.killpg(self.proc.pid, signal.SIGKILL)
        forget(self.proc.pid)


def spawn(name: str, args: list[str], env: dict[str, str], log: Path, core: int | None = None) -> Process:
    """Start ``args`` in its own process group, tied to this process, output to ``log``."""
    if core is not None and shutil.which("taskset"):
        args = ["taskset", "-c", str(core), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("wb")
    proc = popen(args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    handle.close()
    watch(proc.pid, group=True)
    return Process(name, proc, log)


def wait_listening(process: Process, timeout: float) -> tuple[str, str]:
    """The (grpc, metrics) ports the process announces on its first line; raises if it dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _LISTENING.search(process.log.read_text(errors="replace"))
        if match:
            return match.group(1), match.group(2)
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited ({process.proc.returncode}): {tail(process.log)}")
        time.sleep(0.2)
    raise RuntimeError(f"{process.name} did not listen within {timeout:.0f}s: {tail(process.log)}")


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPS_")}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the KV cache size we set
    env.update(
        {
            "LLMOPS_DATA_DIR": str(data_dir),
            "LLMOPS_HOST": "127.0.0.1",
            "LLMOPS_LOG_LEVEL": "WARNING",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "RAY_AUTH_MODE": "disabled",
        }
    )
    return env


@dataclass(frozen=True)
class ReplicaSpec:
    """How each serving replica runs the model."""

    model: Path
    served_name: str
    kv_cache_bytes: int
    max_model_len: int
    max_num_seqs: int = 8  # one core batches little; affinity gives way past 8 running + 2 queued
    enforce_eager: bool = True  # no torch.compile: minutes less start-up on one busy core


def start_replica(spec: ReplicaSpec, index: int, core: int | None, work: Path) -> Process:
    """One ``llmops serve serving`` loading ``spec.model`` at start; returns once it listens."""
    env = base_env(work / f"replica-{index}")
    options = {
        "dtype": "float32",
        "kv_cache_bytes": spec.kv_cache_bytes,
        "max_model_len": spec.max_model_len,
        "max_num_seqs": spec.max_num_seqs,
        "enable_prefix_caching": True,
        "enforce_eager": spec.enforce_eager,
    }
    env.update(
        {
            "LLMOPS_SERVING_MODEL": str(spec.model),
            "LLMOPS_SERVING_SERVED_NAME": spec.served_name,
            "LLMOPS_SERVING_ENGINE_OPTIONS": json.dumps(options),
            "LLMOPS_SERVING_HTTP_PORT": "0",
            "LLMOPS_SERVING_MAX_WAITING": "1024",
        }
    )
    args = [sys.executable, "-m", "llmops.cli", "serve", "serving", "--port", "0", "--metrics-port", "0"]
    process = spawn(f"replica-{index}", args, env, work / f"replica-{index}.log", core)
    grpc_port, metrics_port = wait_listening(process, 300)
    process.address = f"127.0.0.1:{grpc_port}"
    process.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return process


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed ``name{labels}`` (labels as printed)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def total(samples: dict[str, float], name: str) -> float:
    """The sum of every series of ``name`` (any labels)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float:
    """The ``q`` quantile (0..1) of a histogram's observations between two scrapes, summed over
    labels, interpolated linearly inside the bucket it falls in (as Prometheus does); NaN if none."""
    buckets: dict[float, float] = {}
    pattern = re.compile(r'le="([^"]+)"')
    for key, value in after.items():
        if not key.startswith(name + "_bucket"):
            continue
        match = pattern.search(key)
        if match is None:
            continue
        bound = float(match.group(1))
        buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return float("nan")
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf") or count == below:
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def start_router(name: str, endpoints: list[str], work: Path, policy: str = "prefix_affinity") -> Process:
    """``llmops serve router`` over static ``endpoints`` (gRPC only); returns once it listens."""
    env = base_env(work / name)
    env.update(
        {
            "LLMOPS_ROUTER_ENDPOINTS": ",".join(endpoints),
            "LLMOPS_ROUTER_POLICY": policy,
            "LLMOPS_ROUTER_HTTP_ENABLED": "false",
        }
    )
    args = [sys.executable, "-m", "llmops.cli", "serve", "router", "--port", "0", "--metrics-port", "0"]
    process = spawn(name, args, env, work / f"{name}.log")
    grpc_port, metrics_port = wait_listening(process, 120)
    process.address = f"127.0.0.1:{grpc_port}"
    process.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return process


async def wait_router_ready(router: Process, replicas: int, timeout: float = 60.0) -> bool:
    """Wait until the router's admin API lists ``replicas`` READY endpoints."""
    import grpc

    from llmops.proto.router.v1 import router_service_pb2 as pb
    from llmops.proto.router.v1 import router_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                listed = await stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=5)
                if sum(e.state == pb.ENDPOINT_STATE_READY for e in listed.endpoints) >= replicas:
                    return True
            await asyncio.sleep(0.5)
    return False
