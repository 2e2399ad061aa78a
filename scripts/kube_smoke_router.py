"""kube-smoke's router: the champion and the challenger pool answer through a router.

The chart's router finds serving pods through the Kubernetes API (EndpointSlices), which podman does
not have, and the smoke never changes a container's env. So the checks run the same `llmops serve
router` on the host with static discovery of every serving pod the smoke played, otherwise set as the
chart sets it for a cluster with rollouts (router.trafficSplit, router.rollouts.controller): the
registry's alias weights split each model's traffic and the rollout controller runs in it. A request
for ``model@alias`` must reach a pod serving the alias's version.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
LLMOPS = str(ROOT / ".venv" / "bin" / "llmops")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def router_env(endpoints: list[str], registry: str) -> dict[str, str]:
    """The host router's environment: static discovery of ``endpoints``, the registry at ``registry``
    (alias weights, rollouts), alias weights and rollouts polled more often than the defaults (the
    smoke's rollout has short steps); no other LLMOPS_ setting of the caller leaks in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LLMOPS_")} | {
        "LLMOPS_ROUTER_DISCOVERY": "static",
        "LLMOPS_ROUTER_ENDPOINTS": json.dumps(endpoints),
        "LLMOPS_ROUTER_HTTP_ENABLED": "false",
        "LLMOPS_REGISTRY_ADDRESS": registry,
        "LLMOPS_ROUTER_TRAFFIC_SPLIT": "true",
        "LLMOPS_ROUTER_SPLIT_REFRESH_SECONDS": "0.5",
        "LLMOPS_ROUTER_ROLLOUT_CONTROLLER": "true",
        "LLMOPS_ROUTER_ROLLOUT_POLL_SECONDS": "0.5",
        "LLMOPS_ROUTER_CACHE_IN_FRONT": "false",
        "RAY_AUTH_MODE": "disabled",
    }


def start_router(
    endpoints: list[str], log: Path, registry: str, timeout: float = 180
) -> tuple[subprocess.Popen[bytes], str]:
    """`llmops serve router` on the host with :func:`router_env`; returns the process and its address
    once its health is SERVING (the caller stops the process)."""
    port, metrics = _free_port(), _free_port()
    env = router_env(endpoints, registry)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [LLMOPS, "serve", "router", "--port", str(port), "--metrics-port", str(metrics)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the router exited {process.returncode}: {log.read_text()[-1500:]}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return process, address
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    stop_router(process)
    raise RuntimeError(f"the router was not SERVING within {timeout:.0f} s: {log.read_text()[-1500:]}")


def stop_router(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
