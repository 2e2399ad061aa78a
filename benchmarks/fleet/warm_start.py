"""Warm start of a serving pod from the node cache, and weights straight from the store.

Everything runs as its own process, as deployed: moto's S3 server on 127.0.0.1 stands in for the
object store (no real object store was tried: its bandwidth and latency are a real store's best
case), a registry (``llmops serve registry``, MLflow on SQLite, artifact store ``s3://`` on moto),
and serving processes (``llmops serve serving``, transformers engine) that load ``bench@champion``
at start. The model is a Llama in Hugging Face layout built here (the tiny model's tokenizer, random
fp32 weights of a few hundred MB), registered once.

Measured, in alternating rounds (medians):

- time to SERVING of a serving process (spawn to grpc.health SERVING) whose node cache is empty
  (cold: it downloads the version from presigned URLs and verifies it) against one whose node cache
  already holds the version (warm: a second pod on the node, or a restarted one). Goal: warm/cold
  <= 0.2;
- download throughput of the version's files straight from the store (GetArtifactLocations, then
  parallel presigned GETs, each file verified) against the registry's streamed DownloadArtifact,
  the path every pod used before (its registry-side cache warmed first, so this is its best case).

Usage: ``python -m benchmarks.fleet.warm_start [--quick] [--size-mb 400] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save_file

from benchmarks.gate import Goal, alternating, finish, median, quick_default
from benchmarks.llama_weights import llama_weight_shapes
from llmops.common.artifacts.client import download_to_directory, upload_directory
from llmops.common.artifacts.direct import DirectFetcher, DirectLocations
from llmops.common.artifacts.domain import ManifestFile
from llmops.common.artifacts.node_cache import NodeCache
from llmops.common.clients import RegistryClient, ServingClient
from llmops.common.process import popen
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
BUCKET = "llmops-bench"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
console = Console()


def build_model(folder: Path, size_mb: int) -> int:
    """The tiny model's tokenizer with a wider, deeper Llama of random fp32 weights; its bytes."""
    tiny = build_tiny_model().path
    shutil.copytree(
        tiny, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "tiny_model.json")
    )
    config = json.loads((tiny / "config.json").read_text())
    vocab, hidden, heads, kv_heads, intermediate = int(config["vocab_size"]), 1024, 8, 4, 2816
    head_dim = hidden // heads
    per_layer = 4 * (2 * hidden * hidden + 2 * kv_heads * head_dim * hidden + 3 * hidden * intermediate)
    layers = max(1, round((size_mb * 1e6 - 4 * 2 * vocab * hidden) / per_layer))
    config.update(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, head_dim=head_dim, tie_word_embeddings=False, torch_dtype="float32",
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = llama_weight_shapes(
        layers=layers,
        hidden=hidden,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=vocab,
    )
    rng = np.random.default_rng(0)
    tensors = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:
        proc = popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    import boto3  # type: ignore[import-untyped]

    deadline = time.monotonic() + 60
    while True:
        try:
            s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                region_name=AWS_ENV["AWS_DEFAULT_REGION"],
            )
            s3.create_bucket(Bucket=BUCKET)
            return proc, endpoint
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto's S3 server did not start (see {log})") from None
            time.sleep(0.2)


def service_env(work: Path, endpoint: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **AWS_ENV,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "LLMOPS_DATA_DIR": str(work / "data"),
        "LLMOPS_MLFLOW_TRACKING_URI": f"sqlite:///{work / 'data' / 'mlflow.db'}",
        "LLMOPS_MLFLOW_ARTIFACT_ROOT": f"s3://{BUCKET}/mlartifacts",
        "LLMOPS_LOG_LEVEL": "INFO",
        **extra,
    }


def start_service(name: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    """``llmops serve <name>`` on free ports; returns once it prints its port (after its start-up)."""
    command = [sys.executable, "-m", "llmops.cli", "serve", name, "--port", "0", "--metrics-port", "0"]
    with log.open("a") as errors:
        proc = popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            start_new_session=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"grpc=(\d+)", line)
    if not match:
        stop(proc)
        raise RuntimeError(f"{name} did not start: {line!r} (see {log})")
    return proc, f"127.0.0.1:{match.group(1)}"


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def time_to_serving(
    work: Path, endpoint: str, registry: str, cache: Path, log: Path
) -> tuple[float, float]:
    """Seconds from spawning a serving process to its health reporting SERVING, and of its resolve
    phase (fetching and verifying the weights, or finding them in the node cache) from its log."""
    env = service_env(
        work,
        endpoint,
        LLMOPS_REGISTRY_ADDRESS=registry,
        LLMOPS_MODEL_CACHE_DIR=str(cache),
        LLMOPS_SERVING_MODEL="bench@champion",
        LLMOPS_SERVING_ENGINE="transformers",
        LLMOPS_SERVING_HTTP_ENABLED="false",
    )
    started = time.perf_counter()
    proc, address = await asyncio.to_thread(start_service, "serving", env, log)
    try:
        async with ServingClient.connect(address, timeout=30) as client:
            await client.wait_ready(timeout=600, interval=0.02)
        seconds = time.perf_counter() - started
    finally:
        await asyncio.to_thread(stop, proc)
    text = await asyncio.to_thread(log.read_text, errors="replace")
    phases = [line for line in text.splitlines() if "cold start of" in line]
    if not phases:
        raise RuntimeError(f"no cold-start line in {log}")
    # where the time went, from the serving process's own log
    console.print(f"  {phases[-1][phases[-1].index('cold start of') :]}", highlight=False)
    resolve = re.search(r"resolve ([0-9.]+) s", phases[-1])
    return seconds, float(resolve.group(1)) if resolve else math.nan


async def measure(args: argparse.Namespace, work: Path) -> dict[str, list[float]]:
    size = build_model(work / "model", args.size_mb)
    console.print(f"model: {size / 1e6:.0f} MB fp32 Llama in {work / 'model'}")
    logs = REPO / "benchmarks" / "results" / "fleet"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    moto, endpoint = start_moto(logs / "moto.log")
    results: dict[str, list[float]] = {"size": [float(size)]}
    try:
        registry_proc, registry = start_service(
            "registry", service_env(work, endpoint), logs / "registry.log"
        )
        try:
            async with RegistryClient.connect(registry, timeout=600) as client:
                await client.wait_ready(timeout=120)
                meta = pb.VersionMetadata(
                    model_name="bench",
                    create_model=True,
                    format=model_pb2.MODEL_FORMAT_FP32,
                    aliases=["champion"],
                )
                version = await upload_directory(client, meta, work / "model")
                exact = model_pb2.ModelRef(name="bench", version=version.version)
                fetcher = DirectFetcher(concurrency=4, read_timeout=60)

                async def direct(out: Path) -> None:
                    located = await client.unary(
                        client.stub.GetArtifactLocations, pb.GetArtifactLocationsRequest(model=exact)
                    )
                    await fetcher.fetch(DirectLocations.from_proto(located), out)

                async def streamed(out: Path) -> None:
                    await download_to_directory(client, exact, out)

                await streamed(work / "warmup-stream")  # the registry caches the S3 files for streaming
                shutil.rmtree(work / "warmup-stream")
                # The warm node: its cache filled the way serving fills it (same layout, same key).
                warm_cache = work / "warm-node"
                manifest = [ManifestFile(f.path, f.size_bytes, f.sha256) for f in version.manifest]
                await NodeCache(warm_cache).get_or_fill(version.manifest_sha256, manifest, direct)
                for round_, order in enumerate(
                    alternating(["cold", "warm", "direct", "stream"], args.rounds)
                ):
                    for kind in order:
                        if kind in ("cold", "warm"):
                            cache = warm_cache if kind == "warm" else work / f"cold-node-{round_}"
                            log = logs / f"serving-{kind}-{round_}.log"
                            seconds, resolve = await time_to_serving(work, endpoint, registry, cache, log)
                            results.setdefault(f"{kind}_resolve", []).append(resolve)
                            if kind == "cold":
                                shutil.rmtree(cache)
                        else:
                            out = work / f"{kind}-{round_}"
                            began = time.perf_counter()
                            await (direct(out) if kind == "direct" else streamed(out))
                            seconds = time.perf_counter() - began
                            shutil.rmtree(out)
                        results.setdefault(kind, []).append(seconds)
                        console.print(f"round {round_ + 1} {kind}: {seconds:.2f} s")
        finally:
            stop(registry_proc)
    finally:
        stop(moto)
    return results


def report(results: dict[str, list[float]]) -> tuple[float, float]:
    mb = results["size"][0] / 1e6
    rounds = len(results["cold"])
    table = Table(title=f"time to SERVING of a serving process, {mb:.0f} MB model, median of {rounds} rounds")
    for column in ("node cache", "seconds", "rounds"):
        table.add_column(column, justify="right" if column != "node cache" else "left")
    cold, warm = median(results["cold"]), median(results["warm"])
    table.add_row(
        "empty (cold: download from the store)", f"{cold:.2f}", " ".join(f"{s:.2f}" for s in results["cold"])
    )
    table.add_row("holds the version (warm)", f"{warm:.2f}", " ".join(f"{s:.2f}" for s in results["warm"]))
    console.print(table)
    cold_resolve, warm_resolve = median(results["cold_resolve"]), median(results["warm_resolve"])
    console.print(
        f"of which resolving the weights (download + sha256, or the node cache hit): cold {cold_resolve:.3f} s, "
        f"warm {warm_resolve:.3f} s ({warm_resolve / cold_resolve:.3f}x); the rest is the process and engine start"
    )
    throughput = Table(
        title=f"download of the version's files, {mb:.0f} MB, verified, median of {rounds} rounds"
    )
    for column in ("path", "MB/s", "seconds"):
        throughput.add_column(column, justify="right" if column != "path" else "left")
    direct, stream = mb / median(results["direct"]), mb / median(results["stream"])
    throughput.add_row(
        "straight from the store (presigned URLs)", f"{direct:.0f}", f"{median(results['direct']):.2f}"
    )
    throughput.add_row(
        "through the registry (DownloadArtifact)", f"{stream:.0f}", f"{median(results['stream']):.2f}"
    )
    console.print(throughput)
    console.print(f"direct / registry stream throughput: {direct / stream:.2f}x (one client; the registry's "
                  "stream is shared by every pod, the store's bandwidth is not)")  # fmt: skip
    return warm / cold, direct / stream


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", default=quick_default(), help="a 250 MB model")
    parser.add_argument("--size-mb", type=int, default=None, help="model size (default 400; quick 250)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (>= 3)")
    args = parser.parse_args()
    args.size_mb = args.size_mb or (250 if args.quick else 400)
    with tempfile.TemporaryDirectory(prefix="llmops-bench-fleet-") as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    ratio, _ = report(results)
    return finish(Goal("fleet-warm-start-ratio", ratio, "<=", 0.2))


if __name__ == "__main__":
    sys.exit(main())
