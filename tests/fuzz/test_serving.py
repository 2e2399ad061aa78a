"""Fuzzing the serving service (real gRPC server on port 0, the transformers engine on the tiny model).

Invariant: whatever any serving RPC is sent — fuzzed prompts and sampling controls, mutations of
known-good requests, undecodable bytes, an oversized message — the answer is OK or a caller-error
status with a message, never INTERNAL/UNKNOWN/UNAVAILABLE; GenerateStream streams end with a status
of the same kind; afterwards the server is SERVING and a greedy generation still works.

The engine factory lends one started transformers engine (a 128-token context, so a fuzzed
generation stays cheap) to every LoadModel that asks for transformers; vLLM (a minute to start) and
TensorRT-LLM are not part of this stack (their LoadModel answers FAILED_PRECONDITION here). ``max_tokens_limit`` is 16 for the same reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmops.common.errors import FailedPrecondition
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.domain import EngineKind, EngineOptions
from llmops.serving.engines.base import Engine
from tests.fuzz.suite import FuzzSuite, Target
from tests.integration.serving.conftest import BorrowedEngine, serving_settings, start_stack, stop_stack
from tests.registry_support import write_adapter

pytestmark = pytest.mark.fuzz

MODEL = "tiny-fuzz"
SELECTOR = pb.ModelSelector(served_name=MODEL)


def _factory(transformers: Engine) -> object:
    def factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> Engine:
        if kind is EngineKind.TRANSFORMERS:
            return BorrowedEngine(transformers)
        raise FailedPrecondition(f"engine: no {kind.value} engine in the fuzz stack")

    return factory


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    from llmops.serving.engines.transformers_engine import TransformersEngine

    path = build_tiny_model().path
    engine = TransformersEngine(path, MODEL, EngineOptions(max_model_len=128))
    await engine.start()
    settings = serving_settings(LLMOPS_SERVING_MAX_TOKENS_LIMIT="16")
    stack = await start_stack(_factory(engine), settings)
    address = f"127.0.0.1:{stack.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        load = pb.LoadModelRequest(local_path=str(path), served_name=MODEL, engine=pb.ENGINE_TRANSFORMERS)
        await stack.client.stub.LoadModel(load, timeout=60)
        TestServingFuzz.seeds = _seeds(path, write_adapter(tmp_path_factory.mktemp("adapter") / "lora"))

        async def known_good() -> None:
            again = pb.LoadModelRequest(
                local_path=str(path), served_name="known-good", engine=pb.ENGINE_TRANSFORMERS, replace=True
            )
            await stack.client.stub.LoadModel(again, timeout=60)
            request = pb.GenerateRequest(
                model=pb.ModelSelector(served_name="known-good"),
                prompt=generation_pb2.Prompt(text="hello"),
                sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=4, ignore_eos=True),
            )
            response = await stack.client.stub.Generate(request, timeout=60)
            assert len(response.output.completions[0].token_ids) == 4

        yield Target(
            channel, "llmops.serving.v1.ServingService", known_good, settings.max_message_bytes, address
        )
    finally:
        await channel.close()
        await stop_stack(stack)
        await engine.shutdown()


def _seeds(path: Path, adapter: Path) -> dict[str, list[object]]:
    text = generation_pb2.Prompt(text="def add(a, b):")
    chat = generation_pb2.Prompt(
        chat=generation_pb2.ChatPrompt(messages=[generation_pb2.ChatMessage(role="user", content="hi")])
    )
    tokens = generation_pb2.Prompt(tokens=generation_pb2.PromptTokens(token_ids=[5, 6, 7]))
    sampled = sampling_pb2.SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=1, stop=["\n"])
    beams = sampling_pb2.SamplingParams(max_tokens=4, use_beam_search=True, beam_width=2, n=2)
    generate = [
        pb.GenerateRequest(model=SELECTOR, prompt=prompt, sampling=sampling)
        for prompt, sampling in ((text, sampled), (chat, sampled), (tokens, beams))
    ]
    stream = [pb.GenerateStreamRequest.FromString(g.SerializeToString()) for g in generate]
    return {
        "Generate": generate,
        "GenerateStream": stream,
        "Tokenize": [pb.TokenizeRequest(model=SELECTOR, text="hello", return_token_strings=True)],
        "Detokenize": [pb.DetokenizeRequest(model=SELECTOR, token_ids=[5, 6, 7])],
        "LoadModel": [
            pb.LoadModelRequest(local_path=str(path), served_name="fuzz-load", engine=pb.ENGINE_TRANSFORMERS),
        ],
        "UnloadModel": [pb.UnloadModelRequest(model=pb.ModelSelector(served_name="fuzz-load"))],
        "LoadAdapter": [pb.LoadAdapterRequest(base=SELECTOR, local_path=str(adapter), adapter_name="lora")],
        "UnloadAdapter": [pb.UnloadAdapterRequest(base=SELECTOR, adapter_name="lora")],
        "Embed": [pb.EmbedRequest(model=SELECTOR, texts=["hello", "world"])],
    }


class TestServingFuzz(FuzzSuite):
    pb_module = pb
    service = "serving"
    timeout = 60.0
    #: WatchLoad streams until cancelled, a report per heartbeat (up to 60 s apart when fuzzed): a
    #: stream that outlives our deadline is the RPC doing its job.
    extra_allowed = {"WatchLoad": frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})}
    timeouts = {"WatchLoad": 3.0}
    examples = 20
