"""Proto <-> domain conversions for the gRPC servicer; nothing else lives here."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import timestamp_pb2

from llmops.common.convert import model_ref_from_proto
from llmops.common.errors import InvalidArgument
from llmops.proto.common.v1 import compute_pb2, generation_pb2, model_pb2, sampling_pb2, usage_pb2
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.domain import (
    ChatMessage,
    Completion,
    CompletionDelta,
    EmbedRequest,
    EmbedResult,
    EngineKind,
    EngineOptions,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    LoadedAdapter,
    LoadRequest,
    ModelInfo,
    ModelRef,
    ModelSelector,
    ModelSource,
    ModelState,
    Prompt,
    ResolvedModel,
    SamplingParams,
    StreamEnd,
    StructuredOutput,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    TopLogprob,
    Usage,
)
from llmops.serving.load import ModelLoad

ENGINES = {
    pb.ENGINE_VLLM: EngineKind.VLLM,
    pb.ENGINE_TRANSFORMERS: EngineKind.TRANSFORMERS,
    pb.ENGINE_TENSORRT_LLM: EngineKind.TENSORRT_LLM,
}
ENGINE_PROTO = {kind: value for value, kind in ENGINES.items()}
STATES = {
    ModelState.LOADING: pb.LOADED_MODEL_STATE_LOADING,
    ModelState.READY: pb.LOADED_MODEL_STATE_READY,
    ModelState.UNLOADING: pb.LOADED_MODEL_STATE_UNLOADING,
    ModelState.FAILED: pb.LOADED_MODEL_STATE_FAILED,
}
FINISH = {
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: generation_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.ABORT: generation_pb2.FINISH_REASON_ABORT,
}
DTYPES = {
    compute_pb2.PRECISION_UNSPECIFIED: "",
    compute_pb2.PRECISION_FP32: "float32",
    compute_pb2.PRECISION_BF16: "bfloat16",
    compute_pb2.PRECISION_FP16: "float16",
}
DEVICES = {compute_pb2.DEVICE_UNSPECIFIED: "", compute_pb2.DEVICE_CPU: "cpu", compute_pb2.DEVICE_CUDA: "cuda"}


# --- requests -------------------------------------------------------------------------------------


def model_ref(ref: model_pb2.ModelRef) -> ModelRef:
    if not ref.name:
        raise InvalidArgument("must not be empty", field="model_ref.name")
    return model_ref_from_proto(ref)


def selector(message: pb.ModelSelector) -> ModelSelector:
    which = message.WhichOneof("kind")
    if which == "served_name":
        return ModelSelector(served_name=message.served_name)
    if which == "model_ref":
        return ModelSelector(model_ref=model_ref(message.model_ref))
    return ModelSelector()  # unnamed: the service picks the only model, or asks for a name


def sampling(message: sampling_pb2.SamplingParams) -> SamplingParams:
    m = message

    def opt(name: str) -> object:
        return getattr(m, name) if m.HasField(name) else None  # type: ignore[arg-type]

    return SamplingParams(
        greedy=m.greedy,
        temperature=opt("temperature"),  # type: ignore[arg-type]
        top_k=m.top_k,
        top_p=opt("top_p"),  # type: ignore[arg-type]
        min_p=m.min_p,
        repetition_penalty=opt("repetition_penalty"),  # type: ignore[arg-type]
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        logit_bias=dict(m.logit_bias),
        stop=tuple(m.stop),
        stop_token_ids=tuple(m.stop_token_ids),
        include_stop_str_in_output=m.include_stop_str_in_output,
        ignore_eos=m.ignore_eos,
        max_tokens=opt("max_tokens"),  # type: ignore[arg-type]
        min_tokens=m.min_tokens,
        seed=opt("seed"),  # type: ignore[arg-type]
        n=m.n,
        use_beam_search=m.use_beam_search,
        beam_width=m.beam_width,
        length_penalty=opt("length_penalty"),  # type: ignore[arg-type]
        logprobs=opt("logprobs"),  # type: ignore[arg-type]
        prompt_logprobs=opt("prompt_logprobs"),  # type: ignore[arg-type]
        skip_special_tokens=opt("skip_special_tokens"),  # type: ignore[arg-type]
        structured_output=structured_output(m.structured_output) if m.HasField("structured_output") else None,
    )


def structured_output(m: sampling_pb2.StructuredOutput) -> StructuredOutput:
    which = m.WhichOneof("kind")
    if which == "json_schema":
        return StructuredOutput(json_schema=m.json_schema)
    if which == "json_object" and m.json_object:
        return StructuredOutput(json_object=True)
    if which == "regex":
        return StructuredOutput(regex=m.regex)
    if which == "choice" and m.choice.choices:
        return StructuredOutput(choice=tuple(m.choice.choices))
    raise InvalidArgument(
        "set one of json_schema, json_object, regex, choice", field="sampling.structured_output"
    )


TOOL_MODES = {
    generation_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    generation_pb2.TOOL_CHOICE_MODE_NONE: "none",
    generation_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
    generation_pb2.TOOL_CHOICE_MODE_FUNCTION: "function",
}


def tool_calls(calls: Iterable[generation_pb2.ToolCall]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c.id, c.name, c.arguments) for c in calls)


def tool_calls_pb(calls: Iterable[ToolCall]) -> list[generation_pb2.ToolCall]:
    return [generation_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def chat(message: generation_pb2.ChatPrompt) -> tuple[tuple[ChatMessage, ...], bool]:
    messages = tuple(
        ChatMessage(m.role, m.content, m.name, tool_calls(m.tool_calls), m.tool_call_id)
        for m in message.messages
    )
    add = message.add_generation_prompt if message.HasField("add_generation_prompt") else True
    return messages, add


def prompt(message: generation_pb2.Prompt) -> Prompt:
    which = message.WhichOneof("kind")
    if which == "text":
        return Prompt(text=message.text)
    if which == "tokens":
        return Prompt(token_ids=tuple(message.tokens.token_ids))
    if which == "chat":
        messages, add = chat(message.chat)
        c = message.chat
        tools = tuple(Tool(t.name, t.description, t.parameters_json) for t in c.tools)
        choice = None
        if c.HasField("tool_choice") and c.tool_choice.mode != generation_pb2.TOOL_CHOICE_MODE_UNSPECIFIED:
            mode = TOOL_MODES.get(c.tool_choice.mode)
            if mode is None:
                raise InvalidArgument("unknown tool choice mode", field="prompt.chat.tool_choice.mode")
            choice = ToolChoice(mode, c.tool_choice.function_name)
        parallel = c.parallel_tool_calls if c.HasField("parallel_tool_calls") else True
        return Prompt(
            messages=messages,
            add_generation_prompt=add,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=parallel,
        )
    raise InvalidArgument("set text, tokens or chat", field="prompt")


def generation_request(
    message: pb.GenerateRequest | pb.GenerateStreamRequest, timeout: float | None
) -> GenerationRequest:
    return GenerationRequest(
        model=selector(message.model),
        prompt=prompt(message.prompt),
        sampling=sampling(message.sampling),
        adapter=message.adapter,
        request_id=message.request_id,
        timeout=timeout,
        cache_bypass=message.cache.bypass,
        cache_no_store=message.cache.no_store,
    )


def engine_options(message: pb.EngineOptions) -> EngineOptions:
    m = message
    for name in ("max_model_len", "kv_cache_bytes", "tensor_parallel_size", "pipeline_parallel_size",
                 "max_num_seqs", "max_num_batched_tokens", "max_loras", "max_lora_rank"):  # fmt: skip
        if getattr(m, name) < 0:
            raise InvalidArgument("must be >= 0", field=f"options.{name}")
    gpu = m.gpu_memory_utilization if m.HasField("gpu_memory_utilization") else None
    if gpu is not None and not 0 < gpu <= 1:
        raise InvalidArgument("must be in (0, 1]", field="options.gpu_memory_utilization")
    return EngineOptions(
        dtype=DTYPES.get(m.dtype, ""),
        device=DEVICES.get(m.device, ""),
        max_model_len=m.max_model_len,
        gpu_memory_utilization=gpu,
        kv_cache_bytes=m.kv_cache_bytes,
        tensor_parallel_size=m.tensor_parallel_size,
        pipeline_parallel_size=m.pipeline_parallel_size,
        max_num_seqs=m.max_num_seqs,
        max_num_batched_tokens=m.max_num_batched_tokens,
        enable_prefix_caching=m.enable_prefix_caching if m.HasField("enable_prefix_caching") else None,
        enforce_eager=m.enforce_eager,
        quantization=m.quantization,
        enable_lora=m.enable_lora,
        max_loras=m.max_loras,
        max_lora_rank=m.max_lora_rank,
        extra_args=dict(m.extra_args),
    )


def load_request(message: pb.LoadModelRequest) -> LoadRequest:
    which = message.WhichOneof("source")
    if which == "model_ref":
        source = ModelSource(model_ref=model_ref(message.model_ref))
    elif which == "local_path":
        source = ModelSource(local_path=message.local_path)
    else:
        raise InvalidArgument("set model_ref or local_path", field="source")
    return LoadRequest(
        source=source,
        served_name=message.served_name,
        engine=ENGINES.get(message.engine),
        options=engine_options(message.options),
        replace=message.replace,
        no_wait=message.no_wait,
        follow_alias=message.follow_alias,
    )


def drain_timeout(message: pb.UnloadModelRequest) -> float | None:
    """Seconds an unload drains for; ``None`` when unset (the server's default)."""
    if not message.HasField("drain_timeout"):
        return None
    if message.drain_timeout.seconds < 0 or message.drain_timeout.nanos < 0:
        raise InvalidArgument("must not be negative", field="drain_timeout")
    # ToNanoseconds, not ToTimedelta: a timedelta overflows past 999,999,999 days.
    return message.drain_timeout.ToNanoseconds() / 1e9


def adapter_source(message: pb.LoadAdapterRequest) -> ModelSource:
    which = message.WhichOneof("source")
    if which == "adapter_ref":
        return ModelSource(model_ref=model_ref(message.adapter_ref))
    if which == "local_path":
        return ModelSource(local_path=message.local_path)
    raise InvalidArgument("set adapter_ref or local_path", field="source")


# --- responses ------------------------------------------------------------------------------------


def resolved(model: ResolvedModel | None) -> model_pb2.ResolvedModel | None:
    if model is None:
        return None
    return model_pb2.ResolvedModel(name=model.name, version=model.version, alias=model.alias)


def logprobs(entries: Iterable[TokenLogprob]) -> list[generation_pb2.TokenLogprob]:
    return [
        generation_pb2.TokenLogprob(
            token_id=e.token_id,
            token=e.token,
            logprob=e.logprob,
            rank=e.rank,
            top_logprobs=[
                generation_pb2.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob)
                for t in e.top
            ],
        )
        for e in entries
    ]


def usage(u: Usage) -> usage_pb2.Usage:
    return usage_pb2.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
    )


def completion(c: Completion) -> generation_pb2.Completion:
    message = generation_pb2.Completion(
        index=c.index,
        text=c.text,
        token_ids=c.token_ids,
        logprobs=logprobs(c.logprobs),
        finish_reason=FINISH[c.finish_reason],
        stop_sequence=c.stop_sequence,
        tool_calls=tool_calls_pb(c.tool_calls),
    )
    if c.cumulative_logprob is not None:
        message.cumulative_logprob = c.cumulative_logprob
    return message


def generated_output(result: GenerationResult) -> generation_pb2.GeneratedOutput:
    return generation_pb2.GeneratedOutput(
        completions=[completion(c) for c in result.completions],
        prompt_token_ids=result.prompt_token_ids,
        prompt_logprobs=logprobs(result.prompt_logprobs),
        usage=usage(result.usage),
    )


def generate_response(result: GenerationResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=result.request_id,
        served_name=result.served_name,
        model=resolved(result.model),
        output=generated_output(result),
        cached=result.cached,
    )


# --- a stored GeneratedOutput back to domain objects (response cache hits) ---------------------------

FINISH_FROM_PB = {value: reason for reason, value in FINISH.items()}


def logprobs_from_pb(entries: Iterable[generation_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            token_id=e.token_id,
            token=e.token,
            logprob=e.logprob,
            rank=e.rank,
            top=tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in e.top_logprobs),
        )
        for e in entries
    ]


def completion_from_pb(c: generation_pb2.Completion) -> Completion:
    return Completion(
        index=c.index,
        text=c.text,
        token_ids=list(c.token_ids),
        finish_reason=FINISH_FROM_PB.get(c.finish_reason, FinishReason.ABORT),
        logprobs=logprobs_from_pb(c.logprobs),
        stop_sequence=c.stop_sequence,
        cumulative_logprob=c.cumulative_logprob if c.HasField("cumulative_logprob") else None,
        tool_calls=list(tool_calls(c.tool_calls)),
    )


def usage_from_pb(u: usage_pb2.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


def stream_delta(request_id: str, d: CompletionDelta) -> pb.GenerateStreamResponse:
    delta = pb.CompletionDelta(
        index=d.index,
        text_delta=d.text,
        token_ids=d.token_ids,
        logprobs=logprobs(d.logprobs) if d.logprobs else None,
        stop_sequence=d.stop_sequence,
        tool_calls=[
            pb.ToolCallDelta(index=t.index, id=t.id, name=t.name, arguments_delta=t.arguments)
            for t in d.tool_calls
        ],
    )
    if d.finish_reason is not None:
        delta.finish_reason = FINISH[d.finish_reason]
    if d.cumulative_logprob is not None:
        delta.cumulative_logprob = d.cumulative_logprob
    return pb.GenerateStreamResponse(request_id=request_id, cached=d.cached, delta=delta)


def stream_end(request_id: str, end: StreamEnd) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        request_id=request_id,
        cached=end.cached,
        end=pb.GenerateStreamEnd(
            served_name=end.served_name,
            model=resolved(end.model),
            usage=usage(end.usage),
            prompt_token_ids=end.prompt_token_ids,
            prompt_logprobs=logprobs(end.prompt_logprobs),
        ),
    )


def _timestamp(value: object) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


def loaded_adapter(a: LoadedAdapter) -> pb.LoadedAdapter:
    return pb.LoadedAdapter(
        name=a.name,
        adapter=resolved(a.adapter),
        local_path=a.local_path,
        rank=a.rank,
        loaded_at=_timestamp(a.loaded_at),
    )


def options_message(o: EngineOptions) -> pb.EngineOptions:
    message = pb.EngineOptions(
        dtype={v: k for k, v in DTYPES.items()}.get(o.dtype, compute_pb2.PRECISION_UNSPECIFIED),
        device={v: k for k, v in DEVICES.items()}.get(o.device, compute_pb2.DEVICE_UNSPECIFIED),
        max_model_len=o.max_model_len,
        kv_cache_bytes=o.kv_cache_bytes,
        tensor_parallel_size=o.tensor_parallel_size,
        pipeline_parallel_size=o.pipeline_parallel_size,
        max_num_seqs=o.max_num_seqs,
        max_num_batched_tokens=o.max_num_batched_tokens,
        enforce_eager=o.enforce_eager,
        quantization=o.quantization,
        enable_lora=o.enable_lora,
        max_loras=o.max_loras,
        max_lora_rank=o.max_lora_rank,
        extra_args=dict(o.extra_args),
    )
    if o.gpu_memory_utilization is not None:
        message.gpu_memory_utilization = o.gpu_memory_utilization
    if o.enable_prefix_caching is not None:
        message.enable_prefix_caching = o.enable_prefix_caching
    return message


def loaded_model(m: ModelInfo) -> pb.LoadedModel:
    message = pb.LoadedModel(
        served_name=m.served_name,
        model=resolved(m.model),
        local_path=m.local_path,
        engine=ENGINE_PROTO.get(m.engine, pb.ENGINE_UNSPECIFIED),
        options=options_message(m.options),
        state=STATES[m.state],
        error_message=m.error_message,
        max_model_len=m.max_model_len,
        adapters=[loaded_adapter(a) for a in m.adapters],
        loaded_at=_timestamp(m.loaded_at),
        follow_alias=m.follow_alias,
    )
    if m.format:
        message.format = model_pb2.ModelFormat.Value(f"MODEL_FORMAT_{m.format.upper()}")
    return message


def model_load(load: ModelLoad) -> pb.ModelLoad:
    return pb.ModelLoad(
        served_name=load.served_name,
        model=resolved(load.model),
        state=STATES[load.state],
        waiting=load.waiting,
        running=load.running,
        capacity=load.capacity,
        kv_cache_usage=load.kv_cache_usage,
    )


def embed_request(message: pb.EmbedRequest) -> EmbedRequest:
    if message.texts and message.token_inputs:
        raise InvalidArgument("set texts or token_inputs, not both", field="texts")
    inputs: tuple[str | tuple[int, ...], ...] = tuple(message.texts) or tuple(
        tuple(t.token_ids) for t in message.token_inputs
    )
    return EmbedRequest(selector(message.model), inputs, message.request_id)


def embed_response(result: EmbedResult) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        request_id=result.request_id,
        served_name=result.served_name,
        model=resolved(result.model),
        embeddings=[pb.Embedding(values=v) for v in result.embeddings],
        prompt_tokens=result.prompt_tokens,
    )
