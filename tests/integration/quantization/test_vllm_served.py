"""GPTQ and AWQ results are served by vLLM-cpu through the serving service, and vLLM computes what our
dequantized reading of the same folder computes.

Invariants: serving loads the result folder on the vLLM engine (vLLM picks its GPTQ / AWQ loader from
``quantization_config``; no option names it) and generates; along vLLM's own greedy tokens, the
log-probabilities vLLM reports match those of :func:`~llmops.quantization.methods.wna16.load_dequantized`
(the 4-bit weights as fp32, run by transformers) within ``TOLERANCE``, and match them much more
closely than the unquantized source's, so vLLM read the packed codes, scales and zero points as we
wrote them. One vLLM engine runs at a time (each start costs 20-70 s here): the result's engine is
shut down before the next method's starts. Calibration is small (the layout, not the algorithm's
quality, is under test here; ``test_calibrated`` covers that).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from llmops.common.tiny_model import build_tiny_model
from llmops.quantization.calibration import calibration_windows
from llmops.quantization.methods import CalibrationSpec, QuantizationSpec, default_quantizers, resolve
from llmops.quantization.methods.wna16 import load_dequantized
from llmops.serving.app import default_engine_factory
from llmops.serving.config import ServingConfig
from llmops.serving.domain import (
    EngineKind,
    EngineOptions,
    GenerationRequest,
    LoadRequest,
    ModelSelector,
    ModelSource,
    Prompt,
    SamplingParams,
)
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.resolver import LocalPathResolver
from llmops.serving.service import ServingService

pytestmark = pytest.mark.slow

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"
NEW_TOKENS = 16
#: vLLM runs fp16 activations through its 4-bit kernel; we run fp32 on the same 4-bit weights.
TOLERANCE = 0.01
#: A small KV cache and context, as the serving tests' shared engine (other work shares this machine);
#: eager mode halves the start (no torch.compile) and runs the same quantized loader and kernels.
OPTIONS = EngineOptions(kv_cache_bytes=1 << 30, max_model_len=1024, max_num_seqs=8, enforce_eager=True)


@torch.no_grad()
def token_logprobs(model: Any, ids: list[int], prompt_len: int) -> list[float]:
    """Log-probabilities ``model`` gives the tokens after the prompt, teacher-forced in one pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (len, vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[prompt_len - 1 + i, t]) for i, t in enumerate(ids[prompt_len:])]


@pytest.mark.parametrize("method", ["gptq", "awq"])
async def test_vllm_serves_the_result_as_our_dequantized_model_computes_it(
    method: str, tmp_path: Path
) -> None:
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    source = build_tiny_model().path
    quantizer, spec = resolve(
        default_quantizers(),
        QuantizationSpec(method, calibration=CalibrationSpec(num_samples=4, seq_len=64)),
    )
    assert spec.calibration is not None
    windows = calibration_windows(AutoTokenizer.from_pretrained(source), spec.calibration)
    quantizer.quantize(source, tmp_path / method, spec, windows)

    service = ServingService(
        default_engine_factory,
        LocalPathResolver(),
        ServingMetrics(CollectorRegistry()),
        EngineShimMetrics(),
        ServingConfig(default_engine=EngineKind.VLLM),
    )
    try:
        await service.load_model(
            LoadRequest(ModelSource(local_path=str(tmp_path / method)), served_name=method, options=OPTIONS)
        )
        result = await service.generate(
            GenerationRequest(
                ModelSelector(served_name=method),
                Prompt(text=PROMPT),
                SamplingParams(greedy=True, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0),
            )
        )
    finally:
        await service.close()  # stops the EngineCore before another vLLM engine starts

    (completion,) = result.completions
    assert len(completion.token_ids) == NEW_TOKENS and completion.text
    served = [lp.logprob for lp in completion.logprobs]
    ids = [*result.prompt_token_ids, *completion.token_ids]
    ours = token_logprobs(load_dequantized(tmp_path / method), ids, len(result.prompt_token_ids))
    source_model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    unquantized = token_logprobs(source_model.eval(), ids, len(result.prompt_token_ids))

    ours_gap = max(abs(a - b) for a, b in zip(served, ours, strict=True))
    source_gap = max(abs(a - b) for a, b in zip(served, unquantized, strict=True))
    assert ours_gap <= TOLERANCE, f"{method}: vLLM vs our dequantized model: {ours_gap:.4f}"
    assert ours_gap * 5 < source_gap, f"{method}: {ours_gap:.4f} vs the fp32 source's {source_gap:.4f}"
