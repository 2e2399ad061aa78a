"""Beam search over any engine that can give the top next tokens of a batch of sequences.

One implementation for every engine, following vLLM's own (``vllm/entrypoints/.../beam_search``):
at each step every live beam proposes its ``2 * width`` most likely next tokens; an end token (EOS
or a stop token id, once ``min_tokens`` are out, unless ``ignore_eos``) closes a beam, the other
candidates compete on cumulative log-probability and the best ``width`` live on. Finished and live
beams are finally ranked by ``cumulative_logprob / length ** length_penalty`` (the length without
the end token), and the best ``n`` returned, best first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from llmops.serving.domain import Decoding, FinishReason

#: (sequences, k) -> for each sequence, its k most likely next tokens as (token id, logprob).
TopTokens = Callable[[list[list[int]], int], Awaitable[list[list[tuple[int, float]]]]]


@dataclass
class Beam:
    """One hypothesis: generated tokens (without the prompt) and their summed log-probability."""

    tokens: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason = FinishReason.LENGTH

    def score(self, length_penalty: float) -> float:
        length = len(self.tokens) - (1 if self.finish_reason is FinishReason.STOP else 0)
        return float(self.cumulative_logprob / (max(length, 1) ** length_penalty))


async def beam_search(
    top_tokens: TopTokens,
    prompt_ids: Sequence[int],
    decoding: Decoding,
    end_ids: Sequence[int],
    is_cancelled: Callable[[], bool] = lambda: False,
) -> list[Beam]:
    """Run beam search; returns ``decoding.n`` beams, best first.

    ``is_cancelled`` is checked between steps; a cancelled search returns what it has, marked ABORT.
    """
    width = decoding.beam_width
    ends = set(end_ids)
    live = [Beam()]
    done: list[Beam] = []
    for step in range(decoding.max_tokens):
        if is_cancelled():
            for beam in live:
                beam.finish_reason = FinishReason.ABORT
            break
        proposals = await top_tokens([list(prompt_ids) + beam.tokens for beam in live], 2 * width)
        candidates: list[tuple[float, int, Beam]] = []
        for beam, options in zip(live, proposals, strict=True):
            for token_id, logprob in options:
                total = beam.cumulative_logprob + logprob
                if token_id in ends and not decoding.ignore_eos:
                    if step >= decoding.min_tokens:
                        done.append(Beam([*beam.tokens, token_id], total, FinishReason.STOP))
                    continue
                candidates.append((total, token_id, beam))
        candidates.sort(key=lambda c: c[0], reverse=True)
        live = [Beam([*beam.tokens, token_id], total) for total, token_id, beam in candidates[:width]]
        if not live:
            break
    ranked = sorted(done + live, key=lambda b: b.score(decoding.length_penalty), reverse=True)
    return ranked[: decoding.n]
