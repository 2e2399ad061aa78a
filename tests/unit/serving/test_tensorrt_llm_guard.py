"""The TensorRT-LLM engine's import guard, where TensorRT-LLM is not installed (every CPU machine:
it has no CPU build, and its PyPI package only fetches a wheel from NVIDIA's index).

Invariant: the engine module and the default engine factory never import ``tensorrt_llm``; the
engine reports it unavailable; starting it raises FAILED_PRECONDITION saying TensorRT-LLM is not
installed and what to use instead, and leaves the engine not running (unhealthy, Unavailable to
calls). "Not installed" is made real for the test by hiding the module (``sys.modules`` entry
``None``), so the guard is checked on machines where it is installed too.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator

import pytest

from llmops.common.errors import FailedPrecondition, Unavailable
from llmops.serving.domain import Decoding, EngineKind, EngineOptions, EngineRequest


@pytest.fixture
def without_tensorrt_llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # `import tensorrt_llm` raises ImportError
    monkeypatch.delitem(sys.modules, "llmops.serving.engines.tensorrt_llm_engine", raising=False)
    yield


def test_the_module_imports_without_tensorrt_llm(without_tensorrt_llm: None) -> None:
    module = importlib.import_module("llmops.serving.engines.tensorrt_llm_engine")
    assert module.available() is False
    assert sys.modules["tensorrt_llm"] is None  # nothing replaced the hidden module by importing it


async def test_start_refuses_with_a_clear_reason(without_tensorrt_llm: None, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from llmops.serving.app import default_engine_factory

    engine = default_engine_factory(EngineKind.TENSORRT_LLM, tmp_path, "m", EngineOptions())
    assert engine.kind is EngineKind.TENSORRT_LLM
    with pytest.raises(FailedPrecondition) as caught:
        await engine.start()
    message = caught.value.message
    assert "TensorRT-LLM is not installed" in message
    assert "vllm or transformers" in message
    assert await engine.health() is False
    request = EngineRequest(request_id="r", prompt_token_ids=(1, 2), decoding=Decoding(max_tokens=2))
    with pytest.raises(Unavailable, match="TensorRT-LLM engine is not running"):
        async for _ in engine.generate(request):
            pass
    with pytest.raises(Unavailable):
        await engine.tokenize("hello")


def test_it_refuses_the_controls_it_does_not_map() -> None:
    from llmops.serving.engines.tensorrt_llm_engine import TensorRTLLMEngine

    unsupported = {"use_beam_search", "beam_width", "logit_bias", "logprobs", "prompt_logprobs"}
    assert not unsupported & TensorRTLLMEngine.supported_controls
    assert {"temperature", "top_p", "stop", "seed", "max_tokens"} <= TensorRTLLMEngine.supported_controls
