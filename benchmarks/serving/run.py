"""Serving benchmark (`make bench-serving`): our paths against the engine and vLLM's own server.

With the tiny model on vLLM (float32, 1 GiB of KV cache, 1024 context, 64 sequences on both sides), at
each concurrency (quick: 1 and 8; full: 1, 8 and 32) one run measures tokens/s, TTFT p50/p99 and ITL
p50/p99 for:

  engine       our vLLM engine called in-process (no service, no transport): the floor;
  grpc         our gRPC stream (GenerateStream) through the serving server;
  http         our OpenAI HTTP API (/v1/completions, streamed);
  vllm-openai  vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``, same model,
               dtype, KV cache size, context and batch): what a user would run instead of us.

Every client except the engine's runs in its own process (``load.py``). Each round measures every path
in a rotated order (``--rounds``, at least 3), and each number is the median of the rounds. Every
request asks for ``--max-tokens`` tokens (``ignore_eos``, greedy). ``--full`` adds the transformers
engine against vLLM at concurrency 32 (in-process). The whole result goes to ``benchmarks/results/``.

Goals (RESULT lines): our gRPC stream's tokens/s at concurrency 8 >= 0.9x vLLM's own OpenAI server's,
and our gRPC stream's TTFT p50 at concurrency 1 <= vLLM's own server's (ratio <= 1.0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.gate import Goal, alternating, finish, median, percentile, quick_default

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
PATHS = ["engine", "grpc", "http", "vllm-openai"]
MAX_MODEL_LEN, MAX_NUM_SEQS = 1024, 64


def summarize(wall: float, requests: list[dict[str, Any]]) -> dict[str, float]:
    ttft = [r["ttft"] for r in requests]
    itl = [gap for r in requests for gap in r["itl"]]
    tokens = sum(r["tokens"] for r in requests)
    return {
        "requests": len(requests),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
    }


async def in_process(engine: Any, concurrency: int, count: int, max_tokens: int) -> dict[str, float]:
    """(a): the engine's own async API, no service, no transport."""
    from benchmarks.serving.load import prompt
    from llmops.serving.domain import EngineRequest, SamplingParams
    from llmops.serving.validation import to_decoding

    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict[str, Any]:
        async with semaphore:
            ids = await engine.tokenize(prompt(i))
            decoding = to_decoding(
                SamplingParams(max_tokens=max_tokens, ignore_eos=True, greedy=True),
                prompt_len=len(ids),
                max_model_len=engine.max_model_len,
                vocab_size=engine.vocab_size,
            )
            start = time.perf_counter()
            first, last, tokens, gaps = None, start, 0, []
            async for output in engine.generate(EngineRequest(f"bench-{i}", tuple(ids), decoding)):
                count = sum(len(d.token_ids) for d in output.deltas)
                if not count:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.extend([(now - last) / count] * count)
                last, tokens = now, tokens + count
            return {"ttft": (first or last) - start, "itl": gaps, "tokens": tokens}

    await one(-1)
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(count)))
    return summarize(time.perf_counter() - start, list(results))


async def remote(
    path: str, address: str, model: str, concurrency: int, count: int, max_tokens: int
) -> dict[str, float]:
    """(b) and (c): the load generator in its own process, through our servers."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.serving.load", "--path", path, "--address", address, "--model", model,
        "--concurrency", str(concurrency), "--requests", str(count), "--max-tokens", str(max_tokens),
        stdout=asyncio.subprocess.PIPE, cwd=HERE.parent.parent,
    )  # fmt: skip
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed ({path}, concurrency {concurrency})")
    data = json.loads(out)
    return summarize(data["wall"], data["requests"])


def table(rows: list[tuple[str, int, dict[str, float]]]) -> None:
    print(
        f"{'path':<22}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}  (ms)"
    )
    for name, concurrency, r in rows:
        print(
            f"{name:<22}{concurrency:>5}{r['tokens_per_s']:>9.1f}{r['ttft_p50_ms']:>10.2f}{r['ttft_p99_ms']:>10.2f}"
            f"{r['itl_p50_ms']:>9.2f}{r['itl_p99_ms']:>9.2f}"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_vllm_openai(
    model: Path, name: str, kv_bytes: int, log: Path
) -> tuple[asyncio.subprocess.Process, str]:
    """vLLM's own OpenAI server on the model, configured as our engine is; waits until it answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(max(1, kv_bytes >> 30))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
        "--kv-cache-memory-bytes", str(kv_bytes), "--disable-uvicorn-access-log",
        "--uvicorn-log-level", "warning",
        stdout=log.open("wb"), stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"vLLM's OpenAI server exited ({process.returncode}); see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url + "/v1/models")).status_code == 200:
                    return process, url
            await asyncio.sleep(0.5)
    process.kill()
    raise RuntimeError(f"vLLM's OpenAI server did not answer within 600 s; see {log}")


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: median(r[key] for r in runs) for key in runs[0]}


async def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # quiet: the table and RESULT lines
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from prometheus_client import CollectorRegistry

    from llmops.common.server import create_server
    from llmops.common.settings import Settings
    from llmops.common.tiny_model import build_tiny_model
    from llmops.serving.app import ServingApp
    from llmops.serving.domain import EngineKind, EngineOptions, LoadRequest, ModelSource

    model = build_tiny_model()
    env = {"LLMOPS_SERVING_HTTP_PORT": "0", "LLMOPS_GRACE_SECONDS": "5", "LLMOPS_LOG_LEVEL": "WARNING"}
    settings = Settings.load(env=env)
    registry = CollectorRegistry()
    app = ServingApp(settings, registry, http_host="127.0.0.1")
    server, port = await create_server("127.0.0.1:0", app.bindings(), settings, registry=registry)
    await app.start()
    kv_bytes = 1 << 30
    options = EngineOptions(
        dtype="float32", kv_cache_bytes=kv_bytes, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "vllm-openai-server.log"
    started = time.perf_counter()
    vllm_server, vllm_url = await start_vllm_openai(model.path, "tiny-vllm", kv_bytes, log)
    server_start = time.perf_counter() - started
    started = time.perf_counter()
    await app.service.load_model(
        LoadRequest(
            ModelSource(local_path=str(model.path)),
            served_name="tiny-vllm",
            engine=EngineKind.VLLM,
            options=options,
        )
    )
    vllm_start = time.perf_counter() - started
    vllm = app.service.engine_of("tiny-vllm")
    assert vllm is not None
    levels = {1: 8, 8: 32} if args.quick else {1: 8, 8: 32, 32: 64}
    rows: list[tuple[str, int, dict[str, float]]] = []
    results: dict[str, Any] = {}
    grpc_address, http_address = f"127.0.0.1:{port}", f"http://127.0.0.1:{app.http_port}"
    try:
        for concurrency, count in levels.items():
            n = max(concurrency, count // (2 if args.quick else 1))

            async def measure(path: str, c: int = concurrency, n: int = n) -> dict[str, float]:
                if path == "engine":
                    return await in_process(vllm, c, n, args.max_tokens)
                if path == "grpc":
                    return await remote("grpc", grpc_address, "tiny-vllm", c, n, args.max_tokens)
                if path == "http":
                    return await remote("http", http_address, "tiny-vllm", c, n, args.max_tokens)
                return await remote("http", vllm_url, "tiny-vllm", c, n, args.max_tokens)

            runs: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
            for order in alternating(PATHS, args.rounds):
                for path in order:
                    runs[path].append(await measure(path))
            measured = {path: medians(r) for path, r in runs.items()}
            results[f"c{concurrency}"] = {"medians": measured, "rounds": runs}
            rows += [(path, concurrency, r) for path, r in measured.items()]
        if not args.quick:
            started = time.perf_counter()
            await app.service.load_model(
                LoadRequest(
                    ModelSource(local_path=str(model.path)),
                    served_name="tiny-hf",
                    engine=EngineKind.TRANSFORMERS,
                )
            )
            hf = app.service.engine_of("tiny-hf")
            assert hf is not None
            engines = {"vllm": vllm, "transformers": hf}
            runs = {name: [] for name in engines}
            for order in alternating(list(engines), args.rounds):
                for name in order:
                    runs[name].append(await in_process(engines[name], 32, 64, args.max_tokens))
            results["engines_c32"] = {name: medians(r) for name, r in runs.items()}
            rows += [(f"{name} engine", 32, r) for name, r in results["engines_c32"].items()]
    finally:
        await stop_process(vllm_server)
        await server.stop(0)
        await app.close()
    c8, c1 = results["c8"]["medians"], results["c1"]["medians"]
    ratios = {
        "grpc_over_vllm_openai_tokens_per_s_c8": c8["grpc"]["tokens_per_s"]
        / c8["vllm-openai"]["tokens_per_s"],
        "http_over_vllm_openai_tokens_per_s_c8": c8["http"]["tokens_per_s"]
        / c8["vllm-openai"]["tokens_per_s"],
        "grpc_over_engine_tokens_per_s_c8": c8["grpc"]["tokens_per_s"] / c8["engine"]["tokens_per_s"],
        "grpc_over_vllm_openai_ttft_p50_c1": c1["grpc"]["ttft_p50_ms"] / c1["vllm-openai"]["ttft_p50_ms"],
        "grpc_added_ttft_p50_ms_c1": c1["grpc"]["ttft_p50_ms"] - c1["engine"]["ttft_p50_ms"],
    }
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "workload": {"model": "tiny Llama (12.6M parameters)", "max_tokens": args.max_tokens, "levels": levels,
                     "rounds": args.rounds, "quick": args.quick},
        "start_seconds": {"vllm_engine": vllm_start, "vllm_openai_server": server_start},
        "results": results,
        "ratios": ratios,
    }  # fmt: skip
    out = RESULTS / f"serving-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(record, indent=2))
    print(
        f"vLLM start: our engine {vllm_start:.1f} s, vLLM's OpenAI server {server_start:.1f} s; medians of "
        f"{args.rounds} rounds; results in {out.relative_to(HERE.parent.parent)}"
    )
    table(rows)
    print(
        f"grpc/engine tokens/s @8 = {ratios['grpc_over_engine_tokens_per_s_c8']:.3f}; "
        f"http/vllm-openai tokens/s @8 = {ratios['http_over_vllm_openai_tokens_per_s_c8']:.3f}; "
        f"TTFT added by grpc over the engine p50 @1 = {ratios['grpc_added_ttft_p50_ms_c1']:+.2f} ms"
    )
    return finish(
        Goal(
            "serving_grpc_over_vllm_openai_tokens_per_s_c8",
            ratios["grpc_over_vllm_openai_tokens_per_s_c8"],
            ">=",
            0.9,
        ),
        Goal(
            "serving_grpc_over_vllm_openai_ttft_p50_c1",
            ratios["grpc_over_vllm_openai_ttft_p50_c1"],
            "<=",
            1.0,
        ),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", default=quick_default(), help="concurrency 1 and 8, fewer requests"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
