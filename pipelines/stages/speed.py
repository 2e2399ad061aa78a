"""Speed: each variant's decode tokens/s on the engine that would serve it, through the serving service.

Every variant of ``reports/eval.json`` is loaded into serving on its engine (``vllm`` for full
precision and the layouts vLLM reads, ``transformers`` for our INT8 / INT4 formats) under a served
name of its own, with the engine options of ``speed.engine_options``, which the demo serves the
champion with too. After one warm-up request each, every round streams ``tokens`` greedy tokens (EOS
ignored, the cache bypassed) from each variant, in alternating order; a request's decode rate is the
tokens after the first delta over the time from the first delta to the last (prefill excluded), and
a variant's result is the median over ``rounds``. The variants are unloaded at the end. Writes
``reports/speed.json`` (a DVC metrics file).

    python -m stages.speed [--params params.yaml]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from .common import load_params, parser, pipeline_path
from .services import call, read_json, ref, report


async def decode_rate(client: Any, served_name: str, prompt: str, tokens: int) -> float:
    """Decode tokens/s of one greedy request: tokens after the first delta over their time."""
    from llmops.proto.common.v1 import generation_pb2, sampling_pb2
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    request = pb.GenerateStreamRequest(
        model=pb.ModelSelector(served_name=served_name),
        prompt=generation_pb2.Prompt(text=prompt),
        sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=tokens, ignore_eos=True),
        cache=pb.CacheControl(bypass=True, no_store=True),
    )
    first: tuple[float, int] | None = None
    last, total = 0.0, 0
    async for message in client.stream(client.stub.GenerateStream, request):
        if message.WhichOneof("event") != "delta" or not message.delta.token_ids:
            continue
        now = time.perf_counter()
        total += len(message.delta.token_ids)
        if first is None:
            first = (now, total)
        last = now
    if first is None or total <= first[1] or last <= first[0]:
        raise RuntimeError(f"{served_name} streamed {total} tokens in one delta: no decode rate to measure")
    return (total - first[1]) / (last - first[0])


async def load(client: Any, request: Any, *, poll: float = 1.0, timeout: float = 1800.0) -> Any:
    """``LoadModel`` without holding the call open (an engine start takes minutes on a busy CPU):
    asked with ``no_wait``, then ``ListModels`` polled until the version asked for is READY.

    Raises:
        RuntimeError: the load failed (with the engine's error), or was not READY in ``timeout`` s.
    """
    import asyncio

    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    request.no_wait = True
    started = (await client.unary(client.stub.LoadModel, request)).model
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = await client.unary(client.stub.ListModels, pb.ListModelsRequest())
        for model in listed.models:
            if model.served_name != started.served_name or model.model.version != started.model.version:
                continue
            if model.state == pb.LOADED_MODEL_STATE_READY:
                return model
            if model.state == pb.LOADED_MODEL_STATE_FAILED:
                raise RuntimeError(f"loading {model.served_name} failed: {model.error_message}")
        await asyncio.sleep(poll)
    raise RuntimeError(f"{started.served_name} was not ready after {timeout:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    from google.protobuf.duration_pb2 import Duration

    from llmops.common.clients import ServingClient
    from llmops.proto.serving.v1 import serving_service_pb2 as pb

    args = parser(__doc__).parse_args(argv)
    params: dict[str, Any] = load_params(args.params)["speed"]
    evaluation = read_json(pipeline_path("reports/eval.json"))
    variants = {v["model"]: v["engine"] for v in evaluation["variants"]}
    prompt = evaluation["prompts"][0]
    tokens, rounds = int(params["tokens"]), int(params["rounds"])
    engine_options: dict[str, dict[str, Any]] = params.get("engine_options") or {}
    engines = {"vllm": pb.ENGINE_VLLM, "transformers": pb.ENGINE_TRANSFORMERS}

    async def work(client: Any) -> dict[str, list[float]]:
        served = {model: f"speed/{model}" for model in variants}
        loaded: list[str] = []
        try:
            for model, engine in variants.items():
                name, version = model.rsplit(":", 1)
                print(f"speed: loading {model} on {engine}", flush=True)
                await load(
                    client,
                    pb.LoadModelRequest(
                        model_ref=ref(name, version=int(version)),
                        served_name=served[model],
                        engine=engines[engine],  # type: ignore[arg-type]
                        options=pb.EngineOptions(**engine_options.get(engine, {})),
                        replace=True,
                    ),
                )
                loaded.append(served[model])
            for model in variants:  # warm-up
                await decode_rate(client, served[model], prompt, min(tokens, 8))
            samples: dict[str, list[float]] = {model: [] for model in variants}
            order = list(variants)
            for number in range(rounds):
                for model in order if number % 2 == 0 else reversed(order):
                    samples[model].append(await decode_rate(client, served[model], prompt, tokens))
            return samples
        finally:
            for name in loaded:
                await client.unary(
                    client.stub.UnloadModel,
                    pb.UnloadModelRequest(model=pb.ModelSelector(served_name=name), drain_timeout=Duration()),
                )

    samples = call(ServingClient, "serving", work, timeout=900.0)
    results = {
        model: {
            "engine": variants[model],
            "decode_tokens_per_second": statistics.median(rates),
            "rounds": [round(rate, 2) for rate in rates],
        }
        for model, rates in samples.items()
    }
    report(
        "speed", {"tokens": tokens, "rounds": rounds, "engine_options": engine_options, "variants": results}
    )
    for model, result in results.items():
        print(
            f"speed: {model} decodes {result['decode_tokens_per_second']:.1f} tok/s on {result['engine']} "
            f"(median of {result['rounds']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
