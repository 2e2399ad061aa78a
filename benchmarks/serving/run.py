"""Serving benchmark (`make bench-serving`): what our gRPC and HTTP paths add to the engine.

With the tiny model on vLLM, at concurrency 1, 8 and 32, one run measures tokens/s, TTFT p50/p99 and
ITL p50/p99 for (a) the engine called in-process, (b) our gRPC streaming path and (c) our OpenAI HTTP
path (clients in a separate process, as real clients are), then the transformers engine against vLLM
at concurrency 32 (in-process). Every request asks for ``--max-tokens`` tokens (``ignore_eos``,
greedy). The ratios print on the last lines; the whole result goes to ``benchmarks/results/``.

Goals (from the serving issue): (b)/(a) tokens/s >= 0.95 at concurrency 32; TTFT added by (b) <= 2 ms
at p50 (concurrency 1); vLLM >= 1.3x transformers at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
LEVELS = {1: 8, 8: 32, 32: 64}  # concurrency -> requests


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


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
    sys.path.insert(0, str(HERE))
    from load import prompt

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
        sys.executable, str(HERE / "load.py"), "--path", path, "--address", address, "--model", model,
        "--concurrency", str(concurrency), "--requests", str(count), "--max-tokens", str(max_tokens),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed ({path}, concurrency {concurrency})")
    data = json.loads(out)
    return summarize(data["wall"], data["requests"])


def table(rows: list[tuple[str, int, dict[str, float]]]) -> None:
    print(
        f"{'path':<28}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}  (ms)"
    )
    for name, concurrency, r in rows:
        print(
            f"{name:<28}{concurrency:>5}{r['tokens_per_s']:>9.1f}{r['ttft_p50_ms']:>10.2f}{r['ttft_p99_ms']:>10.2f}"
            f"{r['itl_p50_ms']:>9.2f}{r['itl_p99_ms']:>9.2f}"
        )


async def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from prometheus_client import CollectorRegistry

    from llmops.common.server import create_server
    from llmops.common.settings import Settings
    from llmops.common.tiny_model import build_tiny_model
    from llmops.serving.app import ServingApp
    from llmops.serving.domain import EngineKind, EngineOptions, LoadRequest, ModelSource

    model = build_tiny_model()
    env = {"LLMOPS_SERVING_HTTP_PORT": "0", "LLMOPS_GRACE_SECONDS": "5"}
    settings = Settings.load(env=env)
    registry = CollectorRegistry()
    app = ServingApp(settings, registry, http_host="127.0.0.1")
    server, port = await create_server("127.0.0.1:0", app.bindings(), settings, registry=registry)
    await app.start()
    options = EngineOptions(kv_cache_bytes=1 << 30, max_model_len=1024, max_num_seqs=64)
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
    started = time.perf_counter()
    await app.service.load_model(
        LoadRequest(
            ModelSource(local_path=str(model.path)), served_name="tiny-hf", engine=EngineKind.TRANSFORMERS
        )
    )
    hf_start = time.perf_counter() - started
    vllm = app.service.engine_of("tiny-vllm")
    hf = app.service.engine_of("tiny-hf")
    assert vllm is not None and hf is not None
    rows: list[tuple[str, int, dict[str, float]]] = []
    results: dict[str, Any] = {}
    try:
        for concurrency, count in LEVELS.items():
            if args.quick and concurrency == 8:
                continue
            n = max(concurrency, count // (4 if args.quick else 1))
            measured = {
                "a_in_process": await in_process(vllm, concurrency, n, args.max_tokens),
                "b_grpc": await remote("grpc", f"127.0.0.1:{port}", "tiny-vllm", concurrency, n, args.max_tokens),
                "c_http": await remote("http", f"http://127.0.0.1:{app.http_port}", "tiny-vllm", concurrency, n, args.max_tokens),
            }  # fmt: skip
            results[f"vllm_c{concurrency}"] = measured
            rows += [(f"vllm {name}", concurrency, r) for name, r in measured.items()]
        transformers = await in_process(hf, 32, 32 if args.quick else 64, args.max_tokens)
        results["transformers_c32"] = {"a_in_process": transformers}
        rows.append(("transformers a_in_process", 32, transformers))
    finally:
        await server.stop(0)
        await app.close()
    c32, c1 = results["vllm_c32"], results["vllm_c1"]
    ratios = {
        "grpc_over_in_process_tokens_per_s_c32": c32["b_grpc"]["tokens_per_s"]
        / c32["a_in_process"]["tokens_per_s"],
        "http_over_in_process_tokens_per_s_c32": c32["c_http"]["tokens_per_s"]
        / c32["a_in_process"]["tokens_per_s"],
        "grpc_added_ttft_p50_ms_c1": c1["b_grpc"]["ttft_p50_ms"] - c1["a_in_process"]["ttft_p50_ms"],
        "http_added_ttft_p50_ms_c1": c1["c_http"]["ttft_p50_ms"] - c1["a_in_process"]["ttft_p50_ms"],
        "vllm_over_transformers_tokens_per_s_c32": c32["a_in_process"]["tokens_per_s"]
        / transformers["tokens_per_s"],
    }
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "workload": {
            "model": "tiny Llama (12.6M parameters)",
            "max_tokens": args.max_tokens,
            "levels": LEVELS,
            "quick": args.quick,
        },
        "start_seconds": {"vllm": vllm_start, "transformers": hf_start},
        "results": results,
        "ratios": ratios,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"serving-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(record, indent=2))
    print(
        f"\nvLLM start {vllm_start:.1f} s, transformers start {hf_start:.1f} s; results in {out.relative_to(HERE.parent.parent)}\n"
    )
    table(rows)
    goal_tput, goal_ttft, goal_engine = 0.95, 2.0, 1.3
    print()
    print(
        f"grpc/in-process tokens/s @32 = {ratios['grpc_over_in_process_tokens_per_s_c32']:.3f} (goal >= {goal_tput})"
    )
    print(f"http/in-process tokens/s @32 = {ratios['http_over_in_process_tokens_per_s_c32']:.3f}")
    print(
        f"TTFT added by grpc p50 @1    = {ratios['grpc_added_ttft_p50_ms_c1']:+.2f} ms (goal <= {goal_ttft} ms)"
    )
    print(f"TTFT added by http p50 @1    = {ratios['http_added_ttft_p50_ms_c1']:+.2f} ms")
    print(
        f"vllm/transformers tokens/s @32 = {ratios['vllm_over_transformers_tokens_per_s_c32']:.2f} (goal >= {goal_engine})"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--quick", action="store_true", help="Fewer requests and no concurrency 8 (a smoke run)"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
