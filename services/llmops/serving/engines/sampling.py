"""Token selection for engines that run their own decoding loop (transformers, fake).

It follows vLLM's sampler so the controls mean the same on every engine: logit bias and the
min_tokens ban first, then repetition (prompt and output tokens), presence and frequency (output
tokens) penalties, then greedy argmax, or temperature, top-k, top-p and min-p before sampling with
the request's own seeded generator. Log-probabilities are those of the raw model distribution
(vLLM's default ``raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llmops.serving.domain import CompletionDelta, Decoding, FinishReason, TokenLogprob, TopLogprob
from llmops.serving.engines.beam import Beam
from llmops.serving.engines.text import TextAssembler


class TokenSampler:
    """Chooses the next token of ``n`` sequences of one request, step after step.

    Args:
        decoding: the request's controls.
        prompt_ids: the prompt (the repetition penalty covers it).
        vocab_size: width of the logits.
        end_ids: EOS and stop token ids, banned until ``min_tokens`` tokens were generated.
        rows: sequences sampled together (``decoding.n``).
    """

    def __init__(
        self,
        decoding: Decoding,
        prompt_ids: Sequence[int],
        vocab_size: int,
        end_ids: Sequence[int],
        rows: int,
    ) -> None:
        self.decoding = decoding
        self.vocab_size = vocab_size
        self.counts = torch.zeros(rows, vocab_size, dtype=torch.float32)  # (rows, vocab)
        self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool)  # (vocab,)
        ids = [i for i in prompt_ids if 0 <= i < vocab_size]
        if ids:
            self.prompt_mask[torch.tensor(ids)] = True
        self.bias: torch.Tensor | None = None
        if decoding.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for token_id, value in decoding.logit_bias.items():
                self.bias[token_id] = value
        self.end_ids = torch.tensor(sorted({i for i in end_ids if 0 <= i < vocab_size}), dtype=torch.long)
        self.generator = torch.Generator()
        if decoding.seed is not None:
            self.generator.manual_seed(decoding.seed & 0xFFFF_FFFF_FFFF_FFFF)
        else:
            self.generator.seed()

    def step(self, logits: torch.Tensor, generated: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one token per row.

        Args:
            logits: (rows, vocab) next-token logits.
            generated: tokens generated so far per row (all rows advance together).

        Returns:
            (rows,) chosen token ids and (rows, vocab) raw log-probabilities.
        """
        d = self.decoding
        logits = logits.float()[:, : self.vocab_size]
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        x = logits.clone()
        if self.bias is not None:
            x += self.bias
        if generated < d.min_tokens and self.end_ids.numel():
            x[:, self.end_ids] = float("-inf")
        if d.repetition_penalty != 1.0:
            seen = self.prompt_mask.unsqueeze(0) | (self.counts > 0)  # (rows, vocab)
            penalized = torch.where(x > 0, x / d.repetition_penalty, x * d.repetition_penalty)
            x = torch.where(seen, penalized, x)
        if d.presence_penalty:
            x -= d.presence_penalty * (self.counts > 0).float()
        if d.frequency_penalty:
            x -= d.frequency_penalty * self.counts
        tokens = torch.argmax(x, dim=-1) if d.greedy else self._sample(x)
        self.counts[torch.arange(x.shape[0]), tokens] += 1
        return tokens, raw_logprobs

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        d = self.decoding
        x = x / d.temperature
        if 0 < d.top_k < x.shape[-1]:
            kth = torch.topk(x, d.top_k, dim=-1).values[:, -1:]  # (rows, 1)
            x = x.masked_fill(x < kth, float("-inf"))
        if d.top_p < 1.0:
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # Drop a token when the tokens before it already reach top_p (the first always stays).
            drop = (torch.cumsum(probs, dim=-1) - probs) >= d.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
        if d.min_p > 0:
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < d.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def token_logprob(
    raw_logprobs: torch.Tensor, token_id: int, top_n: int, token_text: Callable[[int], str]
) -> TokenLogprob:
    """The log-probability and rank of ``token_id`` in one (vocab,) row, with the ``top_n`` best."""
    chosen = float(raw_logprobs[token_id])
    rank = int((raw_logprobs > chosen).sum()) + 1
    top: tuple[TopLogprob, ...] = ()
    if top_n > 0:
        values, ids = torch.topk(raw_logprobs, top_n)
        top = tuple(
            TopLogprob(int(i), token_text(int(i)), float(v))
            for v, i in zip(values.tolist(), ids.tolist(), strict=True)
        )
    return TokenLogprob(token_id, token_text(token_id), chosen, rank, top)


def prompt_logprobs(
    logits: torch.Tensor, prompt_ids: Sequence[int], top_n: int, token_text: Callable[[int], str]
) -> list[TokenLogprob]:
    """Log-probabilities of prompt tokens 2..P given their prefixes.

    Args:
        logits: (prompt_len, vocab) logits of one forward pass over the prompt.
    """
    raw = torch.log_softmax(logits.float(), dim=-1)
    return [token_logprob(raw[i - 1], prompt_ids[i], top_n, token_text) for i in range(1, len(prompt_ids))]


class CompletionTracker:
    """One completion of a request decoded by our own loop: its text, stop checks and deltas.

    Args:
        index: the completion's index (0 to n-1).
        decoding: the request's controls.
        decode: token ids -> text, honouring ``skip_special_tokens``.
        token_text: one token id -> its text, for log-probabilities.
        end_ids: EOS and stop token ids.
    """

    def __init__(
        self,
        index: int,
        decoding: Decoding,
        decode: Callable[[Sequence[int]], str],
        token_text: Callable[[int], str],
        end_ids: Sequence[int],
    ) -> None:
        self.index = index
        self.decoding = decoding
        self.text = TextAssembler(decode, decoding.stop, decoding.include_stop_str_in_output)
        self.token_text = token_text
        self.end_ids = frozenset(end_ids)
        self.cumulative_logprob = 0.0
        self.finished = False

    def advance(self, token: int, raw_logprobs: torch.Tensor, step: int) -> CompletionDelta:
        """Take the token chosen at ``step`` (0-based); ``raw_logprobs`` is its (vocab,) row."""
        d = self.decoding
        self.cumulative_logprob += float(raw_logprobs[token])
        delta = CompletionDelta(index=self.index, token_ids=[token])
        if d.logprobs is not None:
            delta.logprobs = [token_logprob(raw_logprobs, token, d.logprobs, self.token_text)]
        delta.text, stop = self.text.push([token])
        if stop is not None:
            delta.finish_reason, delta.stop_sequence = FinishReason.STOP_SEQUENCE, stop
        elif token in self.end_ids and not d.ignore_eos:
            delta.finish_reason = FinishReason.STOP
        elif step + 1 >= d.max_tokens:
            delta.finish_reason = FinishReason.LENGTH
        if delta.finish_reason is not None:
            if delta.finish_reason is not FinishReason.STOP_SEQUENCE:
                delta.text += self.text.flush()
            delta.cumulative_logprob = self.cumulative_logprob
            self.finished = True
        return delta


def beam_deltas(beams: Sequence[Beam], decode: Callable[[Sequence[int]], str]) -> list[CompletionDelta]:
    """Finished beams as one delta each, best first (the text leaves out a final end token)."""
    return [
        CompletionDelta(
            index=i,
            text=decode(b.tokens[:-1] if b.finish_reason is FinishReason.STOP else b.tokens),
            token_ids=list(b.tokens),
            finish_reason=b.finish_reason,
            cumulative_logprob=b.cumulative_logprob,
        )
        for i, b in enumerate(beams)
    ]
