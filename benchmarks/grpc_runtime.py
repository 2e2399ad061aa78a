"""What the shared runtime adds to a gRPC call: a plain grpc.aio server vs `create_server`.

Both servers host the same echo handler on 127.0.0.1 and are measured in the same run, alternating
rounds so background load hits both alike. Prints p50/p99 latency of sequential unary calls and
calls/s at a fixed concurrency, and the ratio of ours to plain (1.00 = no overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import grpc
from rich.console import Console
from rich.table import Table

from llmops.common.server import ServiceBinding, create_server
from llmops.common.settings import Settings

SERVICE = "llmops.bench.v1.EchoService"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def _add(servicer: object, server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(_echo, lambda b: b, lambda b: b)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))


async def _plain() -> tuple[Callable[[], Awaitable[None]], int]:
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
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        await echo(b"warm")
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            await echo(b"x" * 64)
            latencies.append(time.perf_counter() - start)
        return latencies


async def _concurrent(port: int, calls: int, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
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


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


async def run(calls: int, rounds: int, concurrency: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, list[float]]] = {"plain": {}, "llmops": {}}
    for _ in range(rounds):
        for name, factory in (("plain", _plain), ("llmops", _ours)):
            stop, port = await factory()
            try:
                lat = await _sequential(port, calls)
                rate = await _concurrent(port, calls, concurrency)
            finally:
                await stop()
            bucket = results[name]
            bucket.setdefault("lat", []).extend(lat)
            bucket.setdefault("rate", []).append(rate)
    summary = {}
    for name, bucket in results.items():
        summary[name] = {
            "p50_ms": _pct(bucket["lat"], 50),
            "p99_ms": _pct(bucket["lat"], 99),
            "calls_per_s": statistics.median(bucket["rate"]),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    summary = asyncio.run(run(args.calls, args.rounds, args.concurrency))
    plain, ours = summary["plain"], summary["llmops"]
    table = Table(title=f"gRPC runtime overhead ({args.calls} calls x {args.rounds} rounds, 127.0.0.1)")
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


if __name__ == "__main__":
    main()
