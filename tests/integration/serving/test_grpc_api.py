"""The gRPC API on a real server (port 0, with the runtime's interceptors) over both real engines.

Invariants: unary and streaming answers agree; the stream ends with exactly one end message with
usage; bad input gets INVALID_ARGUMENT naming the field, an unknown model NOT_FOUND; a cancelled
stream aborts the request inside vLLM; /metrics carries our ``llmops_serving_*`` series and the
``vllm:*`` names for both engines (vLLM's own, and the service's for transformers).
"""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from llmops.common.errors import InvalidArgument, LLMOpsError, NotFound
from llmops.proto.common.v1 import generation_pb2, sampling_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from tests.integration.serving.conftest import Stack

MODELS = ["tiny-hf", "tiny-vllm"]


def request(model: str, text: str = "import os\n", stream: bool = False, **sampling: object) -> object:
    kind = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    return kind(
        model=pb.ModelSelector(served_name=model),
        prompt=generation_pb2.Prompt(text=text),
        sampling=sampling_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def test_models_are_listed_ready_and_health_is_serving(stack: Stack) -> None:
    response = await stack.client.unary(stack.client.stub.ListModels, pb.ListModelsRequest())
    assert [m.served_name for m in response.models] == MODELS
    for model in response.models:
        assert model.state == pb.LOADED_MODEL_STATE_READY and model.max_model_len == 1024
        assert model.local_path and model.loaded_at.seconds > 0
    assert [m.engine for m in response.models] == [pb.ENGINE_TRANSFORMERS, pb.ENGINE_VLLM]
    await stack.client.wait_ready(timeout=10)
    assert await stack.client.health() == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("model", MODELS)
async def test_stream_matches_unary(stack: Stack, model: str) -> None:
    controls = {"greedy": True, "max_tokens": 16, "ignore_eos": True, "logprobs": 1}
    unary = await stack.client.unary(stack.client.stub.Generate, request(model, **controls))
    (completion,) = unary.output.completions
    assert len(completion.token_ids) == 16 and completion.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert unary.output.usage.completion_tokens == 16
    assert unary.output.usage.total_tokens == unary.output.usage.prompt_tokens + 16
    assert unary.served_name == model and len(completion.logprobs) == 16
    messages = [
        m
        async for m in stack.client.stream(
            stack.client.stub.GenerateStream, request(model, stream=True, **controls)
        )
    ]
    deltas = [m.delta for m in messages if m.WhichOneof("event") == "delta"]
    assert [m.WhichOneof("event") for m in messages].count("end") == 1 and messages[-1].WhichOneof(
        "event"
    ) == "end"
    assert "".join(d.text_delta for d in deltas) == completion.text
    assert [t for d in deltas for t in d.token_ids] == list(completion.token_ids)
    assert deltas[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH and deltas[-1].HasField(
        "cumulative_logprob"
    )
    end = messages[-1].end
    assert end.usage.completion_tokens == 16 and list(end.prompt_token_ids) == list(
        unary.output.prompt_token_ids
    )
    assert len({m.request_id for m in messages}) == 1


@pytest.mark.parametrize("model", MODELS)
async def test_client_text_helpers(stack: Stack, model: str) -> None:
    text = await stack.client.generate_text(model, "class A:", max_tokens=8, greedy=True, ignore_eos=True)
    pieces = [
        p
        async for p in stack.client.stream_text(model, "class A:", max_tokens=8, greedy=True, ignore_eos=True)
    ]
    assert "".join(pieces) == text


async def test_tokenize_and_detokenize(stack: Stack) -> None:
    selector = pb.ModelSelector(served_name="tiny-vllm")
    tokens = await stack.client.unary(
        stack.client.stub.Tokenize,
        pb.TokenizeRequest(model=selector, text="def f():", return_token_strings=True),
    )
    assert tokens.max_model_len == 1024 and "".join(tokens.token_strings) == "def f():"
    text = await stack.client.unary(
        stack.client.stub.Detokenize, pb.DetokenizeRequest(model=selector, token_ids=tokens.token_ids)
    )
    assert text.text == "def f():"
    chat = generation_pb2.ChatPrompt(messages=[generation_pb2.ChatMessage(role="user", content="hi")])
    rendered = await stack.client.unary(
        stack.client.stub.Tokenize, pb.TokenizeRequest(model=selector, chat=chat)
    )
    assert rendered.token_ids[0] == 0  # the chat template starts with BOS


BAD_INPUT = [
    ("empty prompt", {"text": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt.text"),
    ("prompt over the context", {"text": "x = 1\n" * 2000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("max_tokens 0", {"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    ("max_tokens over the context", {"max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    ("negative temperature", {"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ("top_p 0", {"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    ("top_p above 1", {"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    ("n above 16", {"n": 17}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.n"),
    ("beam width above 16", {"use_beam_search": True, "beam_width": 17}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.beam_width"),
    ("logprobs above 20", {"logprobs": 21}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.logprobs"),
    ("stop token outside the vocabulary", {"stop_token_ids": [99999]}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop_token_ids"),
    ("unknown model", {"model": "nope"}, grpc.StatusCode.NOT_FOUND, None),
    ("unknown adapter", {"adapter": "sql"}, grpc.StatusCode.NOT_FOUND, None),
    ("no model named", {"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "code", "field"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_bad_input_gets_its_status(
    stack: Stack, case: str, change: dict[str, object], code: grpc.StatusCode, field: str | None, stream: bool
) -> None:
    change = dict(change)
    message = request(str(change.pop("model", "tiny-vllm")), str(change.pop("text", "hello")), stream=stream)
    if "adapter" in change:
        message.adapter = str(change.pop("adapter"))  # type: ignore[attr-defined]
    if message.model.served_name == "":  # type: ignore[attr-defined]
        message.model.ClearField("served_name")  # type: ignore[attr-defined]
    for name, value in change.items():
        if isinstance(value, list):
            getattr(message.sampling, name).extend(value)  # type: ignore[attr-defined]
        else:
            setattr(message.sampling, name, value)  # type: ignore[attr-defined]
    method = stack.client.stub.GenerateStream if stream else stack.client.stub.Generate
    with pytest.raises(grpc.aio.AioRpcError) as info:
        call = method(message, timeout=30)
        if stream:
            async for _ in call:
                pass
        else:
            await call
    assert info.value.code() == code, info.value.details()
    if field is not None:
        assert (info.value.details() or "").startswith(field + ":")


async def test_domain_errors_reach_the_typed_client(stack: Stack) -> None:
    with pytest.raises(NotFound):
        await stack.client.generate_text("nope", "x")
    with pytest.raises(InvalidArgument) as info:
        await stack.client.generate_text("tiny-hf", "x", top_p=2.0)
    assert "sampling.top_p" in info.value.message


async def test_cancelled_stream_aborts_the_vllm_request(stack: Stack, vllm_engine) -> None:  # type: ignore[no-untyped-def]
    call = stack.client.stub.GenerateStream(
        request("tiny-vllm", stream=True, max_tokens=900, ignore_eos=True, greedy=True), timeout=60
    )
    assert (await call.read()).WhichOneof("event") == "delta"
    assert vllm_engine.num_unfinished_requests() == 1
    call.cancel()
    for _ in range(500):
        if vllm_engine.num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.01)
    assert vllm_engine.num_unfinished_requests() == 0
    assert stack.app.service.waiting("tiny-vllm") == 0
    assert await stack.client.generate_text("tiny-vllm", "x", max_tokens=2)  # still serving


def _sockets(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]


async def test_vllm_ipc_sockets_live_in_the_process_folder(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    """vLLM names a ZMQ socket per engine start and never unlinks it: ours go to a folder removed at exit."""
    from llmops.serving.engines.vllm_phases import process_folder

    folder = Path(os.environ["VLLM_RPC_BASE_PATH"])
    assert folder == process_folder() and folder != Path(tempfile.gettempdir())
    assert _sockets(folder)  # the running engine's


async def test_metrics_carry_our_series_and_vllm_names_for_every_engine(stack: Stack) -> None:
    await stack.client.generate_text("tiny-hf", "a", max_tokens=3, ignore_eos=True)
    await stack.client.generate_text("tiny-vllm", "a", max_tokens=3, ignore_eos=True)
    await asyncio.sleep(0.5)  # vLLM publishes engine stats on its own schedule
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(stack.metrics_url, timeout=10).read().decode()
    )
    for model in MODELS:
        assert f'llmops_serving_generated_tokens_total{{model="{model}"}}' in body
        assert (
            f'llmops_serving_model_loaded{{engine="{"transformers" if model == "tiny-hf" else "vllm"}",model="{model}"}} 1.0'
            in body
        )
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):  # fmt: skip
        for model in MODELS:
            assert f'{name}{{engine="0",model_name="{model}"}}' in body, (name, model)
    assert (
        'llmops_grpc_server_handled_total{code="OK",method="Generate",service="llmops.serving.v1.ServingService"}'
        in body
    )


async def test_load_errors(stack: Stack, tiny_model_path) -> None:  # type: ignore[no-untyped-def]
    load = stack.client.stub.LoadModel
    with pytest.raises(LLMOpsError) as info:
        await stack.client.unary(load, pb.LoadModelRequest(local_path="/no/such/folder", served_name="x"))
    assert isinstance(info.value, NotFound)
    with pytest.raises(LLMOpsError) as info:
        await stack.client.unary(
            load,
            pb.LoadModelRequest(
                local_path=str(tiny_model_path), served_name="tiny-hf", engine=pb.ENGINE_TRANSFORMERS
            ),
        )
    assert type(info.value).__name__ == "AlreadyExists"
    with pytest.raises(InvalidArgument) as info:
        await stack.client.unary(
            load,
            pb.LoadModelRequest(
                local_path=str(tiny_model_path),
                served_name="tp",
                engine=pb.ENGINE_TRANSFORMERS,
                options=pb.EngineOptions(tensor_parallel_size=2),
            ),
        )
    assert "options.tensor_parallel_size" in info.value.message
    with pytest.raises(NotFound):
        await stack.client.unary(
            stack.client.stub.UnloadModel, pb.UnloadModelRequest(model=pb.ModelSelector(served_name="nope"))
        )
