"""Client-side TTFT and ITL of a generation stream, from real ``GenerateStreamResponse`` messages.

Invariant: TTFT runs from sending to the first delta with a token; each later token delta is one
ITL gap (empty deltas are not); a cached replay is marked; only an ``end`` message completes it.
"""

from __future__ import annotations

import pytest

from llmops.proto.serving.v1 import serving_service_pb2 as pb
from loadtests.stream_timing import StreamTimer, TokenTiming


def delta(*tokens: int, cached: bool = False) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(cached=cached, delta=pb.CompletionDelta(token_ids=list(tokens)))


END = pb.GenerateStreamResponse(end=pb.GenerateStreamEnd(served_name="tiny"))


def test_ttft_then_one_itl_per_token_delta() -> None:
    timer = StreamTimer(started=10.0)
    timings = [
        timer.observe(delta(1), 10.25),
        timer.observe(delta(), 10.30),  # held-back text: no token, no gap
        timer.observe(delta(2), 10.35),
        timer.observe(delta(3, 4), 10.55),
        timer.observe(END, 10.6),
    ]
    assert timings[0] == TokenTiming("TTFT", pytest.approx(0.25), 1)
    assert timings[1] is None
    assert timings[2] == TokenTiming("ITL", pytest.approx(0.10), 1)
    assert timings[3] == TokenTiming("ITL", pytest.approx(0.20), 2)
    assert timings[4] is None
    assert timer.ended and not timer.cached
    assert timer.tokens == 4
    assert timer.ttft == pytest.approx(0.25)
    assert timer.tokens_per_second() == pytest.approx(3 / 0.30)


def test_a_cached_replay_is_marked() -> None:
    timer = StreamTimer(started=0.0)
    assert timer.observe(delta(1, 2, 3, cached=True), 0.002) == TokenTiming("TTFT", 0.002, 3)
    timer.observe(pb.GenerateStreamResponse(cached=True, end=pb.GenerateStreamEnd()), 0.003)
    assert timer.cached and timer.ended
    assert timer.tokens_per_second() is None  # one delta: no decode rate


def test_a_stream_without_tokens_or_end() -> None:
    timer = StreamTimer(started=0.0)
    timer.observe(delta(), 0.1)
    assert timer.ttft is None and not timer.ended and timer.timings == []
