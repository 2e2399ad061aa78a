"""The TensorRT-LLM engine (NVIDIA GPUs only), through its LLM API (``tensorrt_llm.LLM``).

Import-guarded: this module imports ``tensorrt_llm`` only in :meth:`TensorRTLLMEngine.start`, and a
server without it refuses to load with FAILED_PRECONDITION. Its tests are marked ``gpu``. It honours
the sampling controls TensorRT-LLM's ``SamplingParams`` has; beam search, logit bias and
log-probabilities (this wrapper does not map them yet) are refused (INVALID_ARGUMENT) rather than approximated.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from llmops.common.errors import FailedPrecondition, Unavailable
from llmops.serving.domain import (
    CompletionDelta,
    Decoding,
    EngineKind,
    EngineOptions,
    EngineOutput,
    EngineRequest,
    FinishReason,
)
from llmops.serving.engines.base import ALL_CONTROLS, decode_extra_args
from llmops.serving.engines.hf import HFTokenizer, HFTokenizerEngine, read_config

_UNSUPPORTED_CONTROLS = frozenset(
    {"use_beam_search", "beam_width", "length_penalty", "logit_bias", "logprobs", "prompt_logprobs"}
)


def available() -> bool:
    """Whether TensorRT-LLM is installed here (it has no CPU build)."""
    return importlib.util.find_spec("tensorrt_llm") is not None


def _sampling_params(d: Decoding, end_ids: Sequence[int]) -> Any:
    from tensorrt_llm import SamplingParams  # type: ignore[import-not-found]

    return SamplingParams(
        n=d.n,
        max_tokens=d.max_tokens,
        min_tokens=d.min_tokens or None,
        temperature=0.0 if d.greedy else d.temperature,
        top_k=d.top_k or None,
        top_p=d.top_p,
        min_p=d.min_p or None,
        seed=d.seed,
        repetition_penalty=d.repetition_penalty,
        presence_penalty=d.presence_penalty,
        frequency_penalty=d.frequency_penalty,
        stop=list(d.stop) or None,
        # Every EOS id of generation_config.json, not only the tokenizer's (as the other engines do).
        stop_token_ids=[*d.stop_token_ids, *([] if d.ignore_eos else end_ids)] or None,
        include_stop_str_in_output=d.include_stop_str_in_output,
        ignore_eos=d.ignore_eos,
        skip_special_tokens=d.skip_special_tokens,
    )


class TensorRTLLMEngine(HFTokenizerEngine):
    """A model served by TensorRT-LLM's LLM API on this node's GPUs."""

    not_running_message = "the TensorRT-LLM engine is not running"

    kind = EngineKind.TENSORRT_LLM
    supported_controls = ALL_CONTROLS - _UNSUPPORTED_CONTROLS
    supported_options = frozenset(
        {"dtype", "max_model_len", "tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs",
         "max_num_batched_tokens", "gpu_memory_utilization", "enable_prefix_caching", "quantization", "extra_args"}
    )  # fmt: skip

    def __init__(self, model_path: Path, served_name: str, options: EngineOptions) -> None:
        super().__init__(model_path, served_name, options)
        self._llm: Any = None
        self._config: dict[str, Any] = {}

    async def start(self) -> None:
        if not available():
            raise FailedPrecondition(
                "TensorRT-LLM is not installed on this server: it runs on NVIDIA GPUs only, and its "
                "wheel comes from NVIDIA's package index (pip install tensorrt-llm on a GPU machine); "
                "load the model with engine vllm or transformers instead"
            )
        from tensorrt_llm import LLM  # type: ignore[import-not-found]

        o = self.options
        kwargs: dict[str, Any] = {"model": str(self.model_path), "dtype": o.dtype or "auto"}
        optional = {
            "max_seq_len": o.max_model_len,
            "tensor_parallel_size": o.tensor_parallel_size,
            "pipeline_parallel_size": o.pipeline_parallel_size,
            "max_batch_size": o.max_num_seqs,
            "max_num_tokens": o.max_num_batched_tokens,
        }
        kwargs.update({k: v for k, v in optional.items() if v})
        kwargs.update(decode_extra_args(o))
        self._config = read_config(self.model_path)
        self._tokenizer = await asyncio.to_thread(HFTokenizer, self.model_path)
        self._llm = await asyncio.to_thread(LLM, **kwargs)

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    async def health(self) -> bool:
        return self._llm is not None

    @property
    def max_model_len(self) -> int:
        return int(self.options.max_model_len or self._config.get("max_position_embeddings") or 2048)

    @property
    def vocab_size(self) -> int:
        return int(self._config.get("vocab_size") or len(self.tokenizer.tokenizer))

    @property
    def max_concurrency(self) -> int:
        return self.options.max_num_seqs or 64

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._llm is None:
            raise Unavailable("the TensorRT-LLM engine is not running")
        d = request.decoding
        params = _sampling_params(d, self.tokenizer.end_ids)
        result = self._llm.generate_async(list(request.prompt_token_ids), params, streaming=True)
        done = False
        try:
            async for out in result:
                deltas = []
                for c in out.outputs:
                    reason = None
                    if c.finish_reason == "length":
                        reason = FinishReason.LENGTH
                    elif c.finish_reason == "stop":
                        reason = (
                            FinishReason.STOP_SEQUENCE
                            if isinstance(c.stop_reason, str)
                            else FinishReason.STOP
                        )
                    elif c.finish_reason is not None:
                        reason = FinishReason.ABORT
                    deltas.append(
                        CompletionDelta(
                            index=int(c.index),
                            text=c.text_diff,
                            token_ids=list(c.token_ids_diff),
                            finish_reason=reason,
                            stop_sequence=c.stop_reason if isinstance(c.stop_reason, str) else "",
                            cumulative_logprob=c.cumulative_logprob if reason is not None else None,
                        )
                    )
                yield EngineOutput(deltas=deltas)
            done = True
        finally:
            if not done:
                result.abort()
