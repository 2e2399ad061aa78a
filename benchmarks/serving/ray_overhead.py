"""What Ray Serve's gRPC proxy adds to a serving call, against the replica's own gRPC server.

One Ray Serve replica of the serving deployment (fake engine: no model time, only transport) is
called the two ways a client could reach it, in rounds of alternating order: (1) directly, on the
gRPC server the replica runs itself (what our chart does); (2) through Ray Serve's gRPC proxy (what a
Ray Serve user would pick). Prints p50/p99 of unary Generate (one token) and of the first message of
GenerateStream (medians of the rounds), and the difference. Results go to ``benchmarks/results/``.

Goal: the direct path's unary p50 <= 0.5x the proxy's (the reason serving does not route through
Ray Serve's proxy). ``python -m benchmarks.serving.ray_overhead [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.gate import Goal, alternating, finish, median, percentile, quick_default

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(address: str, metadata: tuple[tuple[str, str], ...], calls: int) -> dict[str, list[float]]:
    import grpc

    from llmops.proto.common.v1 import generation_pb2, sampling_pb2
    from llmops.proto.serving.v1 import serving_service_pb2 as pb
    from llmops.proto.serving.v1 import serving_service_pb2_grpc

    model = pb.ModelSelector(served_name="fake")
    prompt = generation_pb2.Prompt(text="x")
    sampling = sampling_pb2.SamplingParams(max_tokens=1, ignore_eos=True, greedy=True)
    unary, first = [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = serving_service_pb2_grpc.ServingServiceStub(channel)
        for _ in range(5):
            await stub.Generate(
                pb.GenerateRequest(model=model, prompt=prompt, sampling=sampling),
                metadata=metadata,
                timeout=30,
            )
        for _ in range(calls):
            start = time.perf_counter()
            await stub.Generate(
                pb.GenerateRequest(model=model, prompt=prompt, sampling=sampling),
                metadata=metadata,
                timeout=30,
            )
            unary.append(time.perf_counter() - start)
            start = time.perf_counter()
            call = stub.GenerateStream(
                pb.GenerateStreamRequest(model=model, prompt=prompt, sampling=sampling),
                metadata=metadata,
                timeout=30,
            )
            await call.read()
            first.append(time.perf_counter() - start)
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
    return {"unary": unary, "stream_first": first}


async def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from llmops.common.tiny_model import build_tiny_model
    from llmops.serving.serve_app import SERVICER_FUNCTION, deployment

    calls = args.calls or (50 if args.quick else 100)
    model = build_tiny_model().path  # a real folder for the local-path resolver; the fake engine serves it
    proxy_port = free_port()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmops-ray-", dir="/tmp") as temp:
        ray.init(
            num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False, configure_logging=False
        )
        try:
            serve.start(
                http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options=gRPCOptions(port=proxy_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
            )
            env = {"LLMOPS_HOST": "127.0.0.1", "LLMOPS_SERVING_PORT": "0", "LLMOPS_SERVING_METRICS_PORT": "0",
                   "LLMOPS_SERVING_HTTP_ENABLED": "false", "LLMOPS_SERVING_MODEL": str(model),
                   "LLMOPS_SERVING_SERVED_NAME": "fake", "LLMOPS_DATA_DIR": temp}  # fmt: skip
            app = deployment(
                env=env, engine_factory="llmops.serving.engines.fake:fake_engine_factory", num_cpus=0.5
            )
            serve.run(app, name="llmops-serving", route_prefix="/llmops-serving")
            ready = time.perf_counter() - started
            handle = serve.get_deployment_handle("llmops-serving", app_name="llmops-serving")
            direct = (await handle.addresses.remote())["grpc"]
            proxy = f"127.0.0.1:{proxy_port}"
            samples: dict[str, dict[str, list[float]]] = {"direct": {}, "proxy": {}}
            targets = {"direct": (direct, ()), "proxy": (proxy, (("application", "llmops-serving"),))}
            for order in alternating(list(targets), args.rounds):
                for name in order:
                    got = await measure(*targets[name], calls)
                    for key, values in got.items():  # per-round percentiles, in ms
                        for q in (50, 99):
                            samples[name].setdefault(f"{key}_{q}_ms", []).append(percentile(values, q) * 1e3)
        finally:
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()
    summary = {
        path: {key: median(values) for key, values in kinds.items()} for path, kinds in samples.items()
    }
    record = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "ray_ready_seconds": ready,
              "calls": calls * args.rounds, "summary": summary}  # fmt: skip
    results = HERE.parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"serving-ray-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(record, indent=2))
    print(
        f"Ray + Serve + replica ready in {ready:.1f} s; {calls} calls per path per round, {args.rounds} rounds, medians\n"
    )
    print(f"{'path':<10}{'unary p50':>11}{'unary p99':>11}{'1st msg p50':>13}{'1st msg p99':>13}  (ms)")
    for path, s in summary.items():
        print(
            f"{path:<10}{s['unary_50_ms']:>11.2f}{s['unary_99_ms']:>11.2f}{s['stream_first_50_ms']:>13.2f}{s['stream_first_99_ms']:>13.2f}"
        )
    d, p = summary["direct"], summary["proxy"]
    print(f"\nRay Serve gRPC proxy adds {p['unary_50_ms'] - d['unary_50_ms']:+.2f} ms p50 per unary call "
          f"({p['unary_50_ms'] / d['unary_50_ms']:.1f}x) and {p['stream_first_50_ms'] - d['stream_first_50_ms']:+.2f} ms "
          "p50 to a stream's first message")  # fmt: skip
    return finish(Goal("ray_direct_over_proxy_unary_p50", d["unary_50_ms"] / p["unary_50_ms"], "<=", 0.5))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", default=quick_default(), help="50 calls a round")
    parser.add_argument("--calls", type=int, default=None, help="Calls per path per round (default 100)")
    parser.add_argument("--rounds", type=int, default=3)
    sys.exit(asyncio.run(main(parser.parse_args())))
