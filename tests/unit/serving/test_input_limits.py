"""Input limits found by fuzzing (``tests/fuzz``): each is INVALID_ARGUMENT naming the field and the
limit, checked before the work it bounds (a prompt's bytes before tokenizing it, an adapter's
shapes before PEFT alters the served model), and out-of-range durations are caller errors, never
INTERNAL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from google.protobuf import duration_pb2

from llmops.common.errors import InvalidArgument
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving import convert
from llmops.serving.domain import (
    ChatMessage,
    GenerationRequest,
    ModelSelector,
    Prompt,
    SamplingParams,
    TokenizeRequest,
)
from llmops.serving.engines.transformers_engine import _check_adapter_fits
from llmops.serving.validation import (
    MAX_LOGIT_BIAS,
    MAX_PROMPT_BYTES_PER_TOKEN,
    MAX_STOP_TOKEN_IDS,
    check_prompt_size,
    to_decoding,
)
from tests.registry_support import write_adapter
from tests.unit.serving.conftest import Harness

FAKE = ModelSelector(served_name="fake")


def _decode(**sampling: object) -> None:
    to_decoding(SamplingParams(**sampling), prompt_len=4, max_model_len=64, vocab_size=5000)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "at_limit", "over", "words"),
    [
        ("logit_bias", dict.fromkeys(range(MAX_LOGIT_BIAS), 1.0), {MAX_LOGIT_BIAS: 1.0}, "1024 entries"),
        ("stop_token_ids", (7,) * MAX_STOP_TOKEN_IDS, (7,), "64 stop token ids"),
    ],
)
def test_counts_past_the_limit_are_refused(name: str, at_limit: object, over: object, words: str) -> None:
    _decode(**{name: at_limit})
    more = {**at_limit, **over} if isinstance(at_limit, dict) else (*at_limit, *over)  # type: ignore[misc, dict-item]
    with pytest.raises(InvalidArgument, match=words) as error:
        _decode(**{name: more})
    assert error.value.field == f"sampling.{name}"


def test_prompt_size_is_bounded_by_the_context_before_tokenizing() -> None:
    limit = MAX_PROMPT_BYTES_PER_TOKEN * 64
    check_prompt_size("x" * limit, None, 64, "prompt")
    with pytest.raises(InvalidArgument, match=f"at most {limit} bytes") as error:
        check_prompt_size("x" * (limit + 1), None, 64, "prompt")
    assert error.value.field == "prompt"
    chat = (ChatMessage("user", "y" * limit),)
    with pytest.raises(InvalidArgument, match="64-token context"):
        check_prompt_size(None, chat, 64, "prompt")
    with pytest.raises(InvalidArgument, match="65 token ids"):
        check_prompt_size(None, None, 64, "token_ids", tokens=65)


async def test_the_service_refuses_oversized_prompts_tokenize_and_detokenize_input() -> None:
    h = Harness()
    await h.load()
    huge = "x" * (MAX_PROMPT_BYTES_PER_TOKEN * 2048 + 1)
    with pytest.raises(InvalidArgument) as error:
        await h.service.generate(GenerationRequest(FAKE, Prompt(text=huge), SamplingParams(max_tokens=1)))
    assert error.value.field == "prompt"
    with pytest.raises(InvalidArgument) as error:
        await h.service.tokenize(TokenizeRequest(FAKE, text=huge))
    assert error.value.field == "input"
    with pytest.raises(InvalidArgument) as error:
        await h.service.detokenize(FAKE, (5,) * 2049, True)
    assert error.value.field == "token_ids"
    assert await h.service.detokenize(FAKE, (5, 6), True)


@pytest.mark.parametrize("seconds", [-1, -(2**63), 2**63 - 1])
def test_drain_timeout_of_any_size_is_not_internal(seconds: int) -> None:
    request = pb.UnloadModelRequest(drain_timeout=duration_pb2.Duration(seconds=seconds))
    if seconds < 0:
        with pytest.raises(InvalidArgument, match="drain_timeout"):
            convert.drain_timeout(request)
    else:  # once a timedelta overflow (INTERNAL); a caller may ask to drain as long as it likes
        assert convert.drain_timeout(request) == pytest.approx(seconds)
    assert convert.drain_timeout(pb.UnloadModelRequest()) is None


class _Attention(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(hidden, hidden)
        self.v_proj = torch.nn.Linear(hidden, 16)


class _Model(torch.nn.Module):
    """Just the module names of a Llama that the test adapter targets."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
        for layer in self.model.layers:
            layer.self_attn = _Attention(hidden)


def test_an_adapter_of_another_shape_is_refused_before_peft_touches_the_model(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "lora", hidden=32)
    _check_adapter_fits(_Model(32), adapter)  # fits
    with pytest.raises(InvalidArgument, match="layer of size 384") as error:
        _check_adapter_fits(_Model(384), adapter)  # was a RuntimeError from PEFT: INTERNAL
    assert error.value.field == "local_path"
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidArgument, match="not a readable safetensors file"):
        _check_adapter_fits(_Model(32), adapter)
