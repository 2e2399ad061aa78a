"""What the shared runtime adds to a gRPC call: a plain grpc.aio server vs `create_server`.

Both servers host the same echo handler on 127.0.0.1 and are measured in the same run, in rounds
of alternating order so background load hits both alike. Prints p50/p99 latency of sequential unary
calls and calls/s at a fixed concurrency (medians of the rounds), and the ratio of ours to plain
(1.00 = no overhead). The plain server is what a user would write instead of our runtime.

Goals: ours/plain p50 latency <= 1.3 and ours/plain calls/s >= 0.75 (auth, metrics, logging and
deadline interceptors on every call). ``python -m benchmarks.grpc_runtime [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import grpc
from rich.console import Console
from rich.table import Table

from benchmarks.gate import Goal, alternating, finish, median, percentile, quick_default
from llmops.common.server import ServiceBinding, create_server
from llmops.common.settings import Settings

SERVICE = "llmops.bench.v1.EchoService"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


def _add(servicer: object, server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(_echo, lambda b: b, lambda b: b)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))


async def plain_server() -> tuple[Callable[[], Awaitable[None]], int]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    _add(None, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return (lambda: server.stop(0)), port


async def _ours() -> tuple[Callable[[], Awaitable[None]], int]:
    server, port = await create_server(
        "127.0.0.1:0", [ServiceBinding(SERVICE, None, _add)], Settings.load(env={}), metrics_port=0
    )
    return (lambda: server.stop(0)), port


async def _sequential(port: int, calls: int) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo", None, None)
        await echo(b"warm")
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            await echo(b"x" * 64)
            latencies.append(time.perf_counter() - start)
        return latencies


async def _concurrent(port: int, calls: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo", None, None)
        await echo(b"warm")
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await echo(b"x" * 64)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return calls / (time.perf_counter() - start)


async def run(calls: int, rounds: int, concurrency: int) -> dict[str, dict[str, float]]:
    samples: dict[str, dict[str, list[float]]] = {
        name: {"p50": [], "p99": [], "rate": []} for name in ("plain", "llmops")
    }
    factories = {"plain": plain_server, "llmops": _ours}
    for order in alternating(list(factories), rounds):
        for name in order:
            stop, port = await factories[name]()
            try:
                lat = await _sequential(port, calls)
                rate = await _concurrent(port, calls, concurrency)
            finally:
                await stop()
            bucket = samples[name]
            bucket["p50"].append(percentile(lat, 50) * 1000)
            bucket["p99"].append(percentile(lat, 99) * 1000)
            bucket["rate"].append(rate)
    return {
        name: {"p50_ms": median(b["p50"]), "p99_ms": median(b["p99"]), "calls_per_s": median(b["rate"])}
        for name, b in samples.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=quick_default(), help="1000 calls a round")
    parser.add_argument("--calls", type=int, default=None, help="calls per round (default 2000; quick 1000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    calls = args.calls or (1000 if args.quick else 2000)
    summary = asyncio.run(run(calls, args.rounds, args.concurrency))
    plain, ours = summary["plain"], summary["llmops"]
    table = Table(title=f"gRPC runtime overhead ({calls} calls x {args.rounds} rounds, medians, 127.0.0.1)")
    for column in ("server", "p50 ms", "p99 ms", f"calls/s @{args.concurrency}"):
        table.add_column(column, justify="right")
    for name in ("plain", "llmops"):
        row = summary[name]
        table.add_row(name, f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}", f"{row['calls_per_s']:.0f}")
    table.add_row(
        "ratio llmops/plain",
        f"{ours['p50_ms'] / plain['p50_ms']:.2f}x",
        f"{ours['p99_ms'] / plain['p99_ms']:.2f}x",
        f"{ours['calls_per_s'] / plain['calls_per_s']:.2f}x",
    )
    Console().print(table)
    return finish(
        Goal("grpc_runtime_p50_over_plain", ours["p50_ms"] / plain["p50_ms"], "<=", 1.3),
        Goal("grpc_runtime_calls_per_s_over_plain", ours["calls_per_s"] / plain["calls_per_s"], ">=", 0.75),
    )


if __name__ == "__main__":
    sys.exit(main())
