"""The transformers engine: ``AutoModelForCausalLM`` with our own decoding loop; quick to start.

It works on one request at a time (the ``n`` completions of a request decode together as a batch,
sharing the prompt's KV cache layout), on one worker thread so the event loop stays free; the
service queues other requests. Each step's tokens go to the caller at once (real streaming), and a
closed stream stops the loop at the next step. Sampling and beam search are the shared
implementations in :mod:`sampling` and :mod:`beam`, so every control means what it means on vLLM.
LoRA adapters load through PEFT; since requests run one at a time, each activates its own adapter
(or none) for its whole decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from llmops.common.formats import NO_INFERENCE_MODE, own_quant_method
from llmops.common.formats import load_model as load_quantized
from llmops.serving.domain import Decoding, EngineKind, EngineOptions, EngineOutput, EngineRequest
from llmops.serving.engines.base import AdapterInfo, EngineStats, decode_extra_args
from llmops.serving.engines.beam import beam_search
from llmops.serving.engines.guided import Grammars, Guide
from llmops.serving.engines.hf import (
    HFTokenizer,
    HFTokenizerEngine,
    is_causal_lm,
    read_config,
    sentence_pooling,
)
from llmops.serving.engines.sampling import CompletionTracker, TokenSampler, beam_deltas, prompt_logprobs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DONE = object()


class TransformersEngine(HFTokenizerEngine):
    """A Hugging Face causal LM decoded on the CPU (or one GPU) by our own loop."""

    kind = EngineKind.TRANSFORMERS
    supported_options = frozenset({"dtype", "device", "max_model_len", "extra_args"})
    #: ``extra_args`` it understands: ``num_threads`` sets torch's intra-op threads for the process
    #: (1 is fastest for small models on a shared CPU, as vLLM's CPU worker also uses).
    extra_arg_names = frozenset({"num_threads"})

    def __init__(self, model_path: Path, served_name: str, options: EngineOptions) -> None:
        super().__init__(model_path, served_name, options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"transformers-{served_name}")
        self._model: Any = None
        self._device = torch.device("cpu")
        self._max_model_len = 0
        self._vocab_size = 0
        self._running = 0
        self._cache_tokens = 0
        self._adapters: dict[str, AdapterInfo] = {}
        self._grammars: Grammars | None = None
        #: (pooling mode, normalize) for a model loaded to embed; ``None`` for a generator.
        self._pooling: tuple[str, bool] | None = None
        #: How gradients are off while decoding; ``no_grad`` for models whose tensors need version counters.
        self._grad_off: Callable[[], contextlib.AbstractContextManager[Any]] = torch.inference_mode

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    @classmethod
    def check_options(cls, options: EngineOptions) -> None:
        super().check_options(options)
        unknown = sorted(set(options.extra_args) - cls.extra_arg_names)
        if unknown:
            raise InvalidArgument(
                f"the transformers engine has no argument {unknown[0]!r} (known: {', '.join(sorted(cls.extra_arg_names))})",
                field="options.extra_args",
            )
        threads = decode_extra_args(options).get("num_threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InvalidArgument("num_threads must be an integer >= 1", field="options.extra_args")

    @property
    def is_embedding_model(self) -> bool:
        return self._pooling is not None

    def check_decoding(self, decoding: Decoding) -> None:
        super().check_decoding(decoding)
        if decoding.structured_output is not None:
            self._grammar_cache().compile(decoding.structured_output)  # refused now, not mid-stream

    def _grammar_cache(self) -> Grammars:
        if self._grammars is None:
            try:
                self._grammars = Grammars(self.tokenizer.tokenizer, self._vocab_size, self.tokenizer.end_ids)
            except ImportError:
                raise InvalidArgument(
                    "structured outputs need xgrammar, which this server lacks",
                    field="sampling.structured_output",
                ) from None
        return self._grammars

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        if self._pooling is None:
            raise FailedPrecondition(f"{self.served_name} was loaded to generate, not to embed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._embed, inputs)

    def _embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        assert self._pooling is not None
        mode, normalize = self._pooling
        pad = int(getattr(self.tokenizer.tokenizer, "pad_token_id", 0) or 0)
        width = max(len(ids) for ids in inputs)
        ids = torch.tensor(
            [[*x, *[pad] * (width - len(x))] for x in inputs], device=self._device
        )  # (batch, len)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs], device=self._device)
        with self._grad_off():
            hidden = self._model(
                input_ids=ids, attention_mask=mask
            ).last_hidden_state.float()  # (batch, len, dim)
        if mode == "cls":
            vectors = hidden[:, 0]  # (batch, dim)
        else:
            weights = mask.unsqueeze(-1).float()  # (batch, len, 1)
            vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return [[float(v) for v in row] for row in vectors.tolist()]

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        began = time.perf_counter()
        threads = decode_extra_args(self.options).get("num_threads")
        if isinstance(threads, int):
            torch.set_num_threads(threads)
        config = read_config(self.model_path)
        device = self.options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        dtype = _DTYPES.get(self.options.dtype) if self.options.dtype else None
        if dtype is None:
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model: Any
        own_format = own_quant_method(config)
        if not is_causal_lm(config):  # an encoder (sentence-transformers layout): load it to embed
            from transformers import AutoModel

            model = AutoModel.from_pretrained(str(self.model_path), dtype=dtype)
            self._pooling = sentence_pooling(self.model_path)
        elif own_format is None:
            model = AutoModelForCausalLM.from_pretrained(str(self.model_path), dtype=dtype)
        else:  # INT8 dynamic / quanto INT4 folders: a layout of ours that from_pretrained cannot read
            if device != "cpu" or dtype is not torch.float32:
                raise InvalidArgument(
                    f"{own_format} models run on the CPU in float32 (dtype unset or float32)", field="options"
                )
            model = load_quantized(self.model_path, own_format)
            if own_format in NO_INFERENCE_MODE:
                self._grad_off = torch.no_grad
        self._model = model.to(self._device).eval()
        self.load_phases = {"weights": time.perf_counter() - began}  # the rest of start: engine start
        self._tokenizer = HFTokenizer(self.model_path)
        configured = int(config.get("max_position_embeddings") or 2048)
        if self.options.max_model_len > configured:
            raise InvalidArgument(
                f"{self.options.max_model_len} exceeds the model's {configured}",
                field="options.max_model_len",
            )
        self._max_model_len = self.options.max_model_len or configured
        self._vocab_size = int(config.get("vocab_size") or len(self._tokenizer.tokenizer))

    async def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._model = None

    async def health(self) -> bool:
        return self._model is not None

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def stats(self) -> EngineStats:
        usage = min(1.0, self._cache_tokens / self._max_model_len) if self._max_model_len else 0.0
        return EngineStats(running=self._running, kv_cache_usage=usage)

    # --- tokenizer --------------------------------------------------------------------------------

    # --- generation -------------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._model is None:
            raise Unavailable("the model is not loaded")
        if self._pooling is not None:
            raise FailedPrecondition(f"{self.served_name} is an embedding model: it does not generate")
        loop = asyncio.get_running_loop()
        if request.decoding.use_beam_search:
            yield await self._beam(request)
            return
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        work = loop.run_in_executor(self._executor, self._decode_loop, request, emit, cancelled)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, EngineOutput)
                yield item
            await work
        finally:
            cancelled.set()  # a closed or cancelled stream stops the loop at its next step

    def _decode_loop(
        self, request: EngineRequest, emit: Callable[[object], None], cancelled: threading.Event
    ) -> None:
        try:
            self._running += 1
            with self._grad_off(), self._adapter_scope(request.adapter):
                self._decode(request, emit, cancelled)
        except BaseException as exc:
            emit(exc)
        finally:
            self._running -= 1
            self._cache_tokens = 0
            emit(_DONE)

    def _decode(
        self, request: EngineRequest, emit: Callable[[object], None], cancelled: threading.Event
    ) -> None:
        d = request.decoding
        tok = self.tokenizer
        prompt = list(request.prompt_token_ids)
        ends = [*tok.end_ids, *d.stop_token_ids]
        sampler = TokenSampler(d, prompt, self._vocab_size, ends, d.n)
        ids = torch.tensor([prompt] * d.n, device=self._device)  # (n, prompt_len)
        out = self._model(input_ids=ids, use_cache=True)
        first = EngineOutput(deltas=[])
        if d.prompt_logprobs is not None:
            first.prompt_logprobs = prompt_logprobs(out.logits[0], prompt, d.prompt_logprobs, tok.token_text)
        past, logits = out.past_key_values, out.logits[:, -1, :]  # (n, vocab)
        trackers = [
            CompletionTracker(
                i, d, lambda t: tok.decode(t, skip_special_tokens=d.skip_special_tokens), tok.token_text, ends
            )
            for i in range(d.n)
        ]
        guide = None
        if d.structured_output is not None:
            guide = Guide(self._grammar_cache().compile(d.structured_output), self._vocab_size, d.n)
        pending = first
        for step in range(d.max_tokens):
            if cancelled.is_set():
                return
            tokens, raw = sampler.step(logits if guide is None else guide.mask(logits), step)
            for tracker in trackers:
                if not tracker.finished:
                    if guide is not None:
                        guide.advance(tracker.index, int(tokens[tracker.index]))
                    pending.deltas.append(
                        tracker.advance(int(tokens[tracker.index]), raw[tracker.index], step)
                    )
            emit(pending)
            pending = EngineOutput(deltas=[])
            if all(t.finished for t in trackers):
                return
            self._cache_tokens = len(prompt) + step + 1
            out = self._model(
                input_ids=tokens.view(-1, 1).to(self._device), past_key_values=past, use_cache=True
            )
            past, logits = out.past_key_values, out.logits[:, -1, :]

    async def _beam(self, request: EngineRequest) -> EngineOutput:
        d = request.decoding
        tok = self.tokenizer
        loop = asyncio.get_running_loop()

        def top(sequences: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
            # Every beam has the same length, so one unpadded batch serves them all.
            with self._grad_off(), self._adapter_scope(request.adapter):
                ids = torch.tensor(sequences, device=self._device)  # (beams, len)
                logits = self._model(input_ids=ids).logits[:, -1, : self._vocab_size]  # (beams, vocab)
                values, indices = torch.topk(torch.log_softmax(logits.float(), dim=-1), k, dim=-1)
            return [
                list(zip(i.tolist(), v.tolist(), strict=True)) for v, i in zip(values, indices, strict=True)
            ]

        async def top_tokens(sequences: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
            return await loop.run_in_executor(self._executor, top, sequences, k)

        beams = await beam_search(top_tokens, request.prompt_token_ids, d, [*tok.end_ids, *d.stop_token_ids])
        return EngineOutput(
            deltas=beam_deltas(beams, lambda t: tok.decode(t, skip_special_tokens=d.skip_special_tokens))
        )

    # --- LoRA adapters (PEFT) -----------------------------------------------------------------------

    def _adapter_scope(self, adapter: str) -> contextlib.AbstractContextManager[Any]:
        """Runs on the worker thread: the request's adapter active, or none of them."""
        if not self._adapters:
            if adapter:
                raise NotFound(f"adapter {adapter!r} is not loaded on {self.served_name}")
            return contextlib.nullcontext()
        if adapter:
            if adapter not in self._adapters:
                raise NotFound(f"adapter {adapter!r} is not loaded on {self.served_name}")
            self._model.set_adapter(adapter)
            return contextlib.nullcontext()
        return self._model.disable_adapter()  # type: ignore[no-any-return]

    async def load_adapter(self, name: str, path: Path) -> AdapterInfo:
        try:
            rank = int(json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 0))
        except (OSError, ValueError):
            raise InvalidArgument(f"{path} holds no PEFT adapter_config.json", field="local_path") from None

        def attach() -> None:
            from peft import PeftModel

            # PEFT wraps the base's layers in place before it copies the weights in: an adapter of
            # another shape would fail half-way and leave the served model altered.
            _check_adapter_fits(self._model, Path(path))
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(path), adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(path), adapter_name=name).eval()

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, attach)
        except ValueError as exc:  # PEFT's refusals (e.g. target modules the base does not have)
            raise InvalidArgument(
                f"{path} does not apply to {self.served_name}: {exc}", field="local_path"
            ) from None
        self._adapters[name] = AdapterInfo(name, str(path), rank)
        return self._adapters[name]

    async def unload_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            return

        def detach() -> None:
            if self._adapters:
                self._model.delete_adapter(name)
            else:
                self._model = self._model.unload()  # back to the plain base model

        await asyncio.get_running_loop().run_in_executor(self._executor, detach)


def _check_adapter_fits(model: Any, folder: Path) -> None:
    """Raise INVALID_ARGUMENT when a LoRA adapter's matrices do not match the base's layers.

    Reads only the safetensors header (``lora_A``: (rank, in), ``lora_B``: (out, rank)); adapters
    saved in another format are left to PEFT.
    """
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    modules = dict(model.named_modules())
    try:
        with safe_open(str(weights), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # a corrupt or foreign file: safetensors raises its own error types
        raise InvalidArgument(
            f"{weights.name} is not a readable safetensors file: {exc}", field="local_path"
        ) from None
    for key, shape in shapes.items():
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key or len(shape) != 2:
                continue
            name = key.split(part)[0].removeprefix("base_model.model.")
            layer = modules.get(name) or modules.get(f"base_model.model.{name}")
            layer = getattr(layer, "base_layer", layer)  # a layer PEFT already wraps
            expected = getattr(layer, "in_features" if dim == 1 else "out_features", None)
            if isinstance(expected, int) and shape[dim] != expected:  # other layer kinds: PEFT's call
                raise InvalidArgument(
                    f"adapter weight {key} has shape {list(shape)}, which does not fit the base "
                    f"model's layer of size {expected}",
                    field="local_path",
                )
