"""A deterministic in-process engine for tests of everything around the engines.

It has a character-level tokenizer (ids 0-2 are PAD, BOS and EOS; then printable ASCII) and a
"model" whose next-token logits are a fixed seeded function of the last two tokens, so it honours
every decoding control through the same :mod:`sampling` and :mod:`beam` code the transformers engine
uses. Each step can take ``step_delay`` seconds, which lets tests hold requests in flight (queue
bounds, cancellation, deadlines, draining). It starts instantly and needs no files.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import torch

from llmops.common.errors import Unavailable
from llmops.serving.domain import ChatMessage, EngineKind, EngineOptions, EngineOutput, EngineRequest, Tool
from llmops.serving.engines.base import ALL_OPTIONS, AdapterInfo, Engine, EngineStats
from llmops.serving.engines.beam import beam_search
from llmops.serving.engines.sampling import CompletionTracker, TokenSampler, beam_deltas, prompt_logprobs

PAD, BOS, EOS = 0, 1, 2
SPECIAL = ("<pad>", "<bos>", "<eos>")
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n\t"
VOCAB_SIZE = 128  # 3 specials + 97 characters, padded


class FakeEngine(Engine):
    """Deterministic character-level engine.

    Args:
        step_delay: seconds each decoding step takes (0 yields to the loop and goes on).
        max_concurrency: requests generated at once; the service queues the rest.
        context: the context length.
        fail_start: make :meth:`start` fail with this message.
    """

    kind = EngineKind.FAKE
    supported_options = ALL_OPTIONS

    def __init__(
        self,
        model_path: Path | str = "fake",
        served_name: str = "fake",
        options: EngineOptions | None = None,
        *,
        step_delay: float = 0.0,
        max_concurrency: int = 4,
        context: int = 256,
        fail_start: str | None = None,
    ) -> None:
        super().__init__(Path(model_path), served_name, options or EngineOptions())
        self.step_delay = step_delay
        self._max_concurrency = max_concurrency
        self._context = self.options.max_model_len or context
        self._fail_start = fail_start
        self._char_ids = {c: i + len(SPECIAL) for i, c in enumerate(CHARS)}
        generator = torch.Generator().manual_seed(1234)
        # Next-token logits from the last and the second-to-last token: (vocab, vocab) each.
        self._w1 = torch.randn(VOCAB_SIZE, VOCAB_SIZE, generator=generator) * 2.5
        self._w2 = torch.randn(VOCAB_SIZE, VOCAB_SIZE, generator=generator) * 1.0
        self._w1[:, PAD] = self._w2[:, PAD] = float("-inf")
        self._w1[:, BOS] = self._w2[:, BOS] = float("-inf")
        self._w1[:, len(SPECIAL) + len(CHARS) :] = float("-inf")
        self._w1[:, EOS] -= 3.0
        self.started = False
        self.running = 0
        self.aborted = 0
        self.adapters: dict[str, AdapterInfo] = {}
        self.healthy = True

    # --- model ------------------------------------------------------------------------------------

    def _logits(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:  # (batch, vocab)
        last = torch.tensor([s[-1] for s in sequences])
        before = torch.tensor([s[-2] if len(s) > 1 else BOS for s in sequences])
        return self._w1[last] + self._w2[before]

    async def _top_tokens(self, sequences: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        await self._tick()
        raw = torch.log_softmax(self._logits(sequences), dim=-1)
        values, ids = torch.topk(raw, k, dim=-1)
        return [list(zip(i.tolist(), v.tolist(), strict=True)) for v, i in zip(values, ids, strict=True)]

    async def _tick(self) -> None:
        await asyncio.sleep(self.step_delay)

    # --- Engine -----------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.sleep(0)
        if self._fail_start:
            raise RuntimeError(self._fail_start)
        self.started = True

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if not self.started:
            raise Unavailable("fake engine not started")
        d = request.decoding
        prompt = list(request.prompt_token_ids)
        ends = [EOS, *d.stop_token_ids]
        self.running += 1
        finished = False
        try:
            first = EngineOutput(deltas=[])
            if d.prompt_logprobs is not None:
                logits = self._logits([prompt[: i + 1] for i in range(len(prompt))])
                first.prompt_logprobs = prompt_logprobs(logits, prompt, d.prompt_logprobs, self._token_text)
            if d.use_beam_search:
                beams = await beam_search(self._top_tokens, prompt, d, ends)
                first.deltas = beam_deltas(beams, lambda ids: self._decode(ids, d.skip_special_tokens))
                finished = True
                yield first
                return
            sampler = TokenSampler(d, prompt, VOCAB_SIZE, ends, d.n)
            trackers = [
                CompletionTracker(
                    i, d, lambda ids: self._decode(ids, d.skip_special_tokens), self._token_text, ends
                )
                for i in range(d.n)
            ]
            outputs: list[list[int]] = [[] for _ in range(d.n)]
            pending = first
            for step in range(d.max_tokens):
                await self._tick()
                tokens, raw = sampler.step(self._logits([prompt + o for o in outputs]), step)
                for tracker in trackers:
                    if not tracker.finished:
                        token = int(tokens[tracker.index])
                        outputs[tracker.index].append(token)
                        pending.deltas.append(tracker.advance(token, raw[tracker.index], step))
                yield pending
                pending = EngineOutput(deltas=[])
                if all(t.finished for t in trackers):
                    break
            finished = True
        finally:
            self.running -= 1
            if not finished:
                self.aborted += 1

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = [self._char_ids.get(c, self._char_ids["?"]) for c in text]
        return [BOS, *ids] if add_special_tokens else ids

    async def tokenize_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool, tools: Sequence[Tool] = ()
    ) -> list[int]:
        rendered = "".join(f"<{m.role}>\n{m.content}\n" for m in messages)
        if add_generation_prompt:
            rendered += "<assistant>\n"
        return await self.tokenize(rendered)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._decode(token_ids, skip_special_tokens)

    def _decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        parts = []
        for token_id in token_ids:
            if token_id < len(SPECIAL):
                if not skip_special_tokens:
                    parts.append(SPECIAL[token_id])
            elif token_id < len(SPECIAL) + len(CHARS):
                parts.append(CHARS[token_id - len(SPECIAL)])
        return "".join(parts)

    def _token_text(self, token_id: int) -> str:
        return self._decode([token_id], skip_special_tokens=False)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [self._token_text(t) for t in token_ids]

    async def health(self) -> bool:
        return self.started and self.healthy

    async def shutdown(self) -> None:
        self.started = False

    @property
    def max_model_len(self) -> int:
        return self._context

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running)

    async def load_adapter(self, name: str, path: Path) -> AdapterInfo:
        self.adapters[name] = AdapterInfo(name, str(path), rank=8)
        return self.adapters[name]

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)


def fake_engine_factory(kind: EngineKind, path: Path, served_name: str, options: EngineOptions) -> FakeEngine:
    """Serve any model with the fake engine: for measuring the transport, not the model."""
    return FakeEngine(path, served_name, options, max_concurrency=256, context=4096)
