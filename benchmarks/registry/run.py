"""Registry throughput and latency against baselines measured in the same run.

A registry server runs as its own process (``llmops serve registry``, MLflow on SQLite, artifacts
in a local folder), as it would be deployed. Measured, alternating rounds so background load hits
every path alike:

- upload (RegisterVersion of a ~200 MB fp32 Llama folder: transfer, hashing, validation and the
  MLflow registration) and download (DownloadArtifact to a folder, verified on both sides), each
  against a plain disk copy of the same folder (``shutil.copytree``): goal >= 0.5 of its MB/s;
- a second baseline, the verified copy: copy the folder, then sha256 source and copy (what
  ``cp -r`` plus ``sha256sum -c`` on both ends costs) — the least work any checked transfer does;
- what a user would pick instead of us: MLflow's own client on a local tracking store
  (``mlflow.log_artifacts`` + ``register_model`` up, ``download_artifacts`` down), no checksums;
- latency p50/p99 of RegisterVersion (a 100 kB model), ResolveAlias and GetVersion.

Every round runs every transfer in a rotated order; MB/s are medians of the rounds. Goals: upload and
download each >= 0.5x the disk copy's MB/s.

Usage: ``python -m benchmarks.registry.run [--quick] [--size-mb 200] [--rounds 3]`` (quick: 50 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save_file

from benchmarks.gate import Goal, alternating, finish, median, percentile, quick_default
from benchmarks.llama_weights import llama_weight_shapes
from llmops.common.artifacts.client import download_to_directory, upload_directory
from llmops.common.artifacts.manifest import build_manifest
from llmops.common.clients import RegistryClient
from llmops.common.process import popen
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
FP32 = model_pb2.MODEL_FORMAT_FP32
console = Console()


def write_llama(folder: Path, *, layers: int, hidden: int = 512, vocab: int = 32000, seed: int = 0) -> int:
    """A loadable fp32 Llama in Hugging Face layout; returns its size in bytes."""
    folder.mkdir(parents=True)
    heads, kv_heads, intermediate = 4, 2, hidden * 8 // 3
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "tie_word_embeddings": False,
        "max_position_embeddings": 256, "torch_dtype": "float32",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    shapes = llama_weight_shapes(
        layers=layers,
        hidden=hidden,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=vocab,
    )
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    return sum(p.stat().st_size for p in folder.iterdir())


def verified_copy(source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    for folder in (source, target):
        build_manifest(folder)


def layers_for(size_mb: int, hidden: int = 512, vocab: int = 32000) -> int:
    per_layer = 4 * (2 * hidden * hidden + 2 * (hidden // 2) * hidden + 3 * hidden * (hidden * 8 // 3))
    fixed = 4 * 2 * vocab * hidden
    return max(1, round((size_mb * 1e6 - fixed) / per_layer))


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "LLMOPS_DATA_DIR": str(data_dir), "LLMOPS_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "llmops.cli", "serve", "registry", "--port", "0", "--metrics-port", "0"]
    proc = popen(  # tied: it dies with the benchmark, however that ends
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"grpc=(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"registry did not start: {line!r}")
    return proc, f"127.0.0.1:{match.group(1)}"


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def mlflow_paths(work: Path, folder: Path) -> tuple[Callable[[], str], Callable[[str, Path], None]]:
    """What a user would run instead: MLflow's client on a local SQLite store and artifact folder."""
    import logging

    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    experiment = mlflow.create_experiment("bench", artifact_location=str(work / "mlartifacts"))
    registry = MlflowClient()
    registry.create_registered_model("big-mlflow")

    def upload() -> str:
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifacts(str(folder), artifact_path="model")
        registry.create_model_version("big-mlflow", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        return str(run.info.run_id)

    def download(run_id: str, out: Path) -> None:
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(out))

    return upload, download


async def measure(args: argparse.Namespace, work: Path, address: str) -> dict[str, list[float]]:
    big = work / "big"
    size = write_llama(big, layers=layers_for(args.size_mb))
    small = work / "small"
    write_llama(small, layers=1, hidden=32, vocab=256)
    results: dict[str, list[float]] = {"size": [size]}
    async with RegistryClient.connect(address, timeout=600) as client:
        await client.wait_ready(timeout=120)
        meta = pb.VersionMetadata(model_name="small", create_model=True, format=FP32, aliases=["champion"])
        await upload_directory(client, meta, small)  # warm-up: validation imports transformers once
        big_meta = pb.VersionMetadata(model_name="big", create_model=True, format=FP32)
        mlflow_up, mlflow_down = mlflow_paths(work, big)
        for round_, order in enumerate(alternating(["copy", "verified", "registry", "mlflow"], args.rounds)):
            for path in order:
                if path in ("copy", "verified"):
                    copy_to = work / f"{path}-{round_}"
                    copy = shutil.copytree if path == "copy" else verified_copy
                    results.setdefault(path, []).append(
                        await timed(partial(asyncio.to_thread, copy, big, copy_to))
                    )
                    shutil.rmtree(copy_to)
                elif path == "registry":
                    version = 0

                    async def upload() -> None:
                        nonlocal version
                        version = (
                            await upload_directory(client, big_meta, big, chunk_bytes=args.chunk_bytes)
                        ).version

                    results.setdefault("upload", []).append(await timed(upload))
                    out = work / f"download-{round_}"
                    ref = model_pb2.ModelRef(name="big", version=version)
                    download = partial(download_to_directory, client, ref, out, chunk_bytes=args.chunk_bytes)
                    results.setdefault("download", []).append(await timed(download))
                    shutil.rmtree(out)
                else:
                    run_id = ""

                    async def log() -> None:
                        nonlocal run_id
                        run_id = await asyncio.to_thread(mlflow_up)

                    results.setdefault("mlflow_upload", []).append(await timed(log))
                    out = work / f"mlflow-{round_}"
                    results.setdefault("mlflow_download", []).append(
                        await timed(partial(asyncio.to_thread, mlflow_down, run_id, out))
                    )
                    shutil.rmtree(out)
        for _ in range(args.latency_calls // 10):
            results.setdefault("register", []).append(
                await timed(partial(upload_directory, client, meta, small))
            )
        resolve = pb.ResolveAliasRequest(model_name="small", alias="champion")
        get = pb.GetVersionRequest(model=model_pb2.ModelRef(name="small", version=1))
        for _ in range(args.latency_calls):
            results.setdefault("resolve", []).append(
                await timed(partial(client.unary, client.stub.ResolveAlias, resolve))
            )
            results.setdefault("get", []).append(
                await timed(partial(client.unary, client.stub.GetVersion, get))
            )
    return results


def report(results: dict[str, list[float]]) -> tuple[float, float]:
    """Print the tables; the upload's and the download's MB/s over the disk copy's."""
    mb = results["size"][0] / 1e6
    rate = {key: mb / median(results[key]) for key in results if key != "size" and key in TRANSFERS}
    table = Table(
        title=f"registry transfers: {mb:.0f} MB fp32 model, median of {len(results['copy'])} rounds"
    )
    for column in ("path", "MB/s", "vs disk copy", "vs verified copy", "goal (vs disk copy)"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for key, label in TRANSFERS.items():
        goal = ""
        if key in ("upload", "download"):
            goal = "≥ 0.50 " + ("met" if rate[key] / rate["copy"] >= 0.5 else "MISSED")
        table.add_row(
            label,
            f"{rate[key]:.0f}",
            f"{rate[key] / rate['copy']:.2f}",
            f"{rate[key] / rate['verified']:.2f}",
            goal,
        )
    console.print(table)
    latency = Table(title="registry call latency (ms)")
    for column in ("call", "p50", "p99", "calls"):
        latency.add_column(column, justify="right" if column != "call" else "left")
    for key, label in (
        ("register", "RegisterVersion (100 kB)"),
        ("resolve", "ResolveAlias"),
        ("get", "GetVersion"),
    ):
        samples = [s * 1000 for s in results[key]]
        latency.add_row(
            label, f"{percentile(samples, 50):.1f}", f"{percentile(samples, 99):.1f}", str(len(samples))
        )
    console.print(latency)
    return rate["upload"] / rate["copy"], rate["download"] / rate["copy"]


TRANSFERS = {
    "copy": "disk copy (shutil.copytree)",
    "verified": "verified copy (copy + sha256 of both)",
    "upload": "upload (RegisterVersion)",
    "download": "download (DownloadArtifact)",
    "mlflow_upload": "MLflow log_artifacts + register_model",
    "mlflow_download": "MLflow download_artifacts",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", default=quick_default(), help="a 50 MB model")
    parser.add_argument("--size-mb", type=int, default=None, help="size of the big model (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of copy/upload/download")
    parser.add_argument("--latency-calls", type=int, default=200, help="calls per latency measurement")
    parser.add_argument("--chunk-bytes", type=int, default=1024 * 1024, help="upload/download chunk size")
    args = parser.parse_args()
    args.size_mb = args.size_mb or (50 if args.quick else 200)
    if args.quick:
        args.latency_calls = min(args.latency_calls, 100)
    with tempfile.TemporaryDirectory(prefix="llmops-bench-registry-") as tmp:
        work = Path(tmp)
        proc, address = start_server(work / "data")
        try:
            results = asyncio.run(measure(args, work, address))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    upload, download = report(results)
    return finish(
        Goal("registry_upload_over_disk_copy", upload, ">=", 0.5),
        Goal("registry_download_over_disk_copy", download, ">=", 0.5),
    )


if __name__ == "__main__":
    sys.exit(main())
