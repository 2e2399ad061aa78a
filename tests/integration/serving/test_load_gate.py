"""The promote stage's load gate, for real: headless Locust against a serving process, judged.

Invariant: a short Locust run of stream users against a real ``llmops serve serving`` process (tiny
model, transformers engine) measures calls, tokens and TTFT; when that replica fails a share of its
generations (``serving.faults.error_ratio``), the gate sees the failures and fails on the error
ratio, naming it, with the other numbers still measured.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from pipelines.stages.gates import LoadBounds, judge_load, run_locust
from tests.integration.serving.conftest import serving_process

pytestmark = pytest.mark.slow


async def test_the_load_gate_fails_a_replica_that_fails_requests(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    async with serving_process(
        tiny_model_path, tmp_path, grace=2, LLMOPS_SERVING_FAULTS__ERROR_RATIO="0.3"
    ) as (_, address):
        measured = await asyncio.to_thread(
            run_locust, address, "tiny", seconds=6, users=2, max_tokens=8, out=tmp_path / "locust"
        )
    assert measured.requests >= 4 and 0 < measured.failures < measured.requests
    assert measured.tokens == 8 * (measured.requests - measured.failures)  # ignore_eos: exact counts
    assert math.isfinite(measured.ttft_p95_ms) and measured.tokens_per_second > 0
    verdict = judge_load(measured, LoadBounds(max_error_ratio=0.05, max_ttft_p95_ms=60_000, min_requests=4))
    assert (
        not verdict.passed
        and "error ratio" in verdict.reason
        and "TTFT" not in verdict.reason.split("breached: ")[1]
    ), verdict.reason
