"""Registry throughput and latency against baselines measured in the same run.

A registry server runs as its own process (``llmops serve registry``, MLflow on SQLite, artifacts
in a local folder), as it would be deployed. Measured, alternating rounds so background load hits
every path alike:

- upload (RegisterVersion of a ~200 MB fp32 Llama folder: transfer, hashing, validation and the
  MLflow registration) and download (DownloadArtifact to a folder, verified on both sides), each
  against a plain disk copy of the same folder (``shutil.copytree``): goal >= 0.5 of its MB/s;
- a second baseline, the verified copy: copy the folder, then sha256 source and copy (what
  ``cp -r`` plus ``sha256sum -c`` on both ends costs) — the least work any checked transfer does;
- latency p50/p99 of RegisterVersion (a 100 kB model), ResolveAlias and GetVersion.

Usage: ``python benchmarks/registry/run.py [--size-mb 200] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
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

from llmops.common.clients import RegistryClient
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from llmops.registry.client import download_to_directory, upload_directory
from llmops.registry.manifest import build_manifest

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
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
        }
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
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"grpc=(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"registry did not start: {line!r}")
    return proc, f"127.0.0.1:{match.group(1)}"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


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
        for round_ in range(args.rounds):
            copy_to = work / f"copy-{round_}"
            results.setdefault("copy", []).append(
                await timed(partial(asyncio.to_thread, shutil.copytree, big, copy_to))
            )
            shutil.rmtree(copy_to)
            results.setdefault("verified", []).append(
                await timed(partial(asyncio.to_thread, verified_copy, big, copy_to))
            )
            shutil.rmtree(copy_to)
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


def report(results: dict[str, list[float]]) -> None:
    size = results["size"][0]
    mb = size / 1e6
    copy_rate = mb / statistics.median(results["copy"])
    table = Table(
        title=f"registry transfers: {mb:.0f} MB fp32 model, median of {len(results['copy'])} rounds"
    )
    verified_rate = mb / statistics.median(results["verified"])
    for column in ("path", "MB/s", "vs disk copy", "vs verified copy", "goal (vs disk copy)"):
        table.add_column(column, justify="right" if column != "path" else "left")
    table.add_row("disk copy (shutil.copytree)", f"{copy_rate:.0f}", "1.00", "", "")
    table.add_row(
        "verified copy (copy + sha256 of both)",
        f"{verified_rate:.0f}",
        f"{verified_rate / copy_rate:.2f}",
        "1.00",
        "",
    )
    for key, label in (("upload", "upload (RegisterVersion)"), ("download", "download (DownloadArtifact)")):
        rate = mb / statistics.median(results[key])
        ratio = rate / copy_rate
        goal = "≥ 0.50 " + ("met" if ratio >= 0.5 else "NOT met")
        table.add_row(label, f"{rate:.0f}", f"{ratio:.2f}", f"{rate / verified_rate:.2f}", goal)
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
            label, f"{percentile(samples, 0.5):.1f}", f"{percentile(samples, 0.99):.1f}", str(len(samples))
        )
    console.print(latency)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=200, help="size of the big model")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of copy/upload/download")
    parser.add_argument("--latency-calls", type=int, default=200, help="calls per latency measurement")
    parser.add_argument("--chunk-bytes", type=int, default=1024 * 1024, help="upload/download chunk size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmops-bench-registry-") as tmp:
        work = Path(tmp)
        proc, address = start_server(work / "data")
        try:
            results = asyncio.run(measure(args, work, address))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
