"""Client-side timing of one generation stream, from its messages alone (no Locust, no gRPC calls).

A ``GenerateStream`` call answers with deltas (``WhichOneof("event") == "delta"``, new token ids of
one completion) and then one ``end``. The timer turns arrival times into what a user of the stream
feels:

* **TTFT**: from sending the request to the first delta that carries a token;
* **ITL**: the gap between consecutive token-carrying deltas, one value per gap (the unit the
  server's ``llmops_serving_inter_token_latency_seconds`` histogram observes, so the two compare);
  a delta carrying ``k`` tokens counts as one gap of ``k`` tokens;
* the stream's tokens, whether it replayed a cached answer, and whether the ``end`` arrived.

Empty deltas (tokens held back, e.g. while they might start a stop string) are not gaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TokenTiming:
    """One timing taken from a stream: ``kind`` is ``"TTFT"`` or ``"ITL"``."""

    kind: str
    seconds: float
    tokens: int


@dataclass
class StreamTimer:
    """Feed it every message of one stream with its arrival time (``time.perf_counter()``)."""

    started: float
    tokens: int = 0
    cached: bool = False
    ended: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    timings: list[TokenTiming] = field(default_factory=list)

    def observe(self, message: Any, now: float) -> TokenTiming | None:
        """Account for one ``GenerateStreamResponse``; returns the timing it completes, if any."""
        self.cached = self.cached or bool(message.cached)
        kind = message.WhichOneof("event")
        if kind == "end":
            self.ended = True
            return None
        if kind != "delta":
            return None
        count = len(message.delta.token_ids)
        if count == 0:
            return None
        if self.last_token_at is None:
            self.first_token_at = now
            timing = TokenTiming("TTFT", now - self.started, count)
        else:
            timing = TokenTiming("ITL", now - self.last_token_at, count)
        self.last_token_at = now
        self.tokens += count
        self.timings.append(timing)
        return timing

    @property
    def ttft(self) -> float | None:
        """Seconds to the first token; ``None`` when no token arrived."""
        return None if self.first_token_at is None else self.first_token_at - self.started

    def tokens_per_second(self) -> float | None:
        """Decode rate after the first token; ``None`` with fewer than two token deltas."""
        first_at, last_at = self.first_token_at, self.last_token_at
        if first_at is None or last_at is None or last_at <= first_at:
            return None
        first = self.timings[0].tokens
        return (self.tokens - first) / (last_at - first_at)
