"""Load generator for the serving benchmark: streams N requests at a concurrency through gRPC or HTTP.

Run by ``benchmarks/serving/run.py`` as a separate process (so the client's CPU is not charged to
the server's event loop); prints one JSON object: the wall time and, per request, the time to the
first token, the gaps between token-bearing messages (per token) and the tokens received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


def prompt(i: int) -> str:
    return f"# request {i}\ndef function_{i}(value):\n    "


async def grpc_request(stub: Any, model: str, i: int, max_tokens: int) -> dict[str, Any]:
    from llmops.proto.common.v1 import generation_pb2, sampling_pb2
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    request = pb.GenerateStreamRequest(
        model=pb.ModelSelector(served_name=model),
        prompt=generation_pb2.Prompt(text=prompt(i)),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, greedy=True),
    )
    start = time.perf_counter()
    first, last, tokens, gaps = None, start, 0, []
    async for message in stub.GenerateStream(request, timeout=600):
        if message.WhichOneof("event") != "delta" or not message.delta.token_ids:
            continue
        now, count = time.perf_counter(), len(message.delta.token_ids)
        if first is None:
            first = now
        else:
            gaps.extend([(now - last) / count] * count)
        last, tokens = now, tokens + count
    return {"ttft": (first or last) - start, "itl": gaps, "tokens": tokens, "duration": last - start}


async def http_request(client: Any, url: str, model: str, i: int, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first, last, tokens, gaps = None, start, 0, []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if not choices or not choices[0].get("text"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now  # one chunk per engine step: the gap is the inter-token latency
    return {"ttft": (first or last) - start, "itl": gaps, "tokens": tokens, "duration": last - start}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(args.concurrency)
    if args.path == "grpc":
        import grpc

        from llmops.proto.serving.v1 import serving_service_pb2_grpc

        channel = grpc.aio.insecure_channel(args.address)
        stub = serving_service_pb2_grpc.ServingServiceStub(channel)

        async def one(i: int) -> dict[str, Any]:
            async with semaphore:
                return await grpc_request(stub, args.model, i, args.max_tokens)

        await one(-1)  # connect and warm up
        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
        await channel.close(None)
    else:
        import httpx

        limits = httpx.Limits(
            max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4
        )
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:

            async def one(i: int) -> dict[str, Any]:
                async with semaphore:
                    return await http_request(client, args.address, args.model, i, args.max_tokens)

            await one(-1)
            start = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(args.requests)))
            wall = time.perf_counter() - start
    return {"wall": wall, "requests": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", choices=["grpc", "http"], required=True)
    parser.add_argument("--address", required=True, help="host:port for gRPC, http://host:port for HTTP")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    json.dump(asyncio.run(main(parser.parse_args())), sys.stdout)
