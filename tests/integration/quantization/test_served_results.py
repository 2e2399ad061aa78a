"""INT8 dynamic and quanto INT4 results reach serving: registered in a real registry server, loaded from
there by serving's transformers engine, and computing what the in-memory quantized model computes.

Invariants: the result folder passes the registry's checks (safetensors and a ``quantization_config``,
no pickle); serving loads the version by reference into INT8 / INT4 modules (the quantized kernels,
not a dequantized float copy); the served model's logits equal the in-memory quantized model's; the
serving API's greedy tokens, their log-probabilities and the prompt's log-probabilities are the
in-memory model's own (an incremental decode, as the engine runs it); asking for a precision the
format does not run, or for the vLLM engine (which has no loader for our layouts), is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from prometheus_client import CollectorRegistry

from llmops.common.artifacts.client import upload_directory
from llmops.common.artifacts.sinks import RegistrySink, VersionMetadata
from llmops.common.clients import RegistryClient
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.quantization.methods import (
    QuantizationSpec,
    default_quantizers,
    int8_dynamic,
    quanto_int4,
    resolve,
)
from llmops.serving.app import default_engine_factory
from llmops.serving.config import ServingConfig
from llmops.serving.domain import (
    EngineKind,
    EngineOptions,
    GenerationRequest,
    LoadRequest,
    ModelRef,
    ModelSelector,
    ModelSource,
    Prompt,
    SamplingParams,
)
from llmops.serving.engines.base import Engine
from llmops.serving.metrics import EngineShimMetrics, ServingMetrics
from llmops.serving.resolver import RegistryResolver
from llmops.serving.service import ServingService
from tests.integration.registry.conftest import RunningRegistry, start_registry, stop_registry

pytestmark = pytest.mark.slow

PROMPT = "import os\nimport sys\n\ndef main(argv):\n"
NEW_TOKENS = 12
#: method -> (spec, registry format, the Linear class serving must run, the in-memory model builder)
CASES: dict[str, tuple[QuantizationSpec, str, str, Any]] = {
    "int8_dynamic": (
        QuantizationSpec("int8_dynamic"),
        "int8",
        "torch.ao.nn.quantized.dynamic.modules.linear.Linear",
        lambda src: int8_dynamic.quantize_model(src),
    ),
    "int4_weight_only": (
        QuantizationSpec("int4_weight_only", group_size=64),
        "int4",
        "optimum.quanto.nn.qlinear.QLinear",
        lambda src: quanto_int4.quantize_model(src, 64),
    ),
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningRegistry]:
    root = tmp_path_factory.mktemp("served-registry")
    running = await start_registry(root / "registry", tmp_path_factory.getbasetemp())
    tiny = await upload_directory(
        running.client,
        rpb.VersionMetadata(model_name="tiny", create_model=True, format=model_pb2.MODEL_FORMAT_FP32),
        build_tiny_model().path,
    )
    assert (tiny.name, tiny.version) == ("tiny", 1)
    yield running
    await stop_registry(running)


@torch.no_grad()  # not inference_mode: quanto tensors need version counters
def incremental_greedy(
    model: Any, prompt: list[int], steps: int
) -> tuple[torch.Tensor, list[int], list[float]]:
    """Prompt logits, then greedy tokens and their log-probabilities one step at a time (KV cache)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    prompt_logits = out.logits[0]  # (prompt_len, vocab)
    past, logits = out.past_key_values, out.logits[0, -1]
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(steps):
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits.float(), dim=-1)[token]))
        out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return prompt_logits, tokens, logprobs


@pytest.mark.parametrize("method", sorted(CASES))
async def test_registered_result_is_served_by_the_transformers_engine(
    method: str, registry: RunningRegistry, tmp_path: Path
) -> None:
    spec, fmt, module_class, in_memory = CASES[method]
    source = build_tiny_model().path
    quantizer, checked = resolve(default_quantizers(), spec)
    quantizer.quantize(source, tmp_path / "result", checked)
    registered = await asyncio.to_thread(  # the sink runs its own event loop, as in a job's thread
        RegistrySink(registry.address, timeout=120).register,
        VersionMetadata(
            model_name=f"tiny-{method.replace('_', '-')}",
            parent_name="tiny",
            parent_version=1,
            description=f"tiny quantized with {method}",
            tags={"quantization_method": method},
            format=fmt,
        ),
        tmp_path / "result",
    )
    rc = registry.client
    ref = model_pb2.ModelRef(name=registered.name, version=registered.version)
    version = (await rc.unary(rc.stub.GetVersion, rpb.GetVersionRequest(model=ref))).version
    assert version.status == rpb.VERSION_STATUS_READY
    assert version.format == model_pb2.ModelFormat.Value(f"MODEL_FORMAT_{fmt.upper()}")
    assert (version.lineage.parent.name, version.lineage.parent.version) == ("tiny", 1)

    engines: list[Engine] = []

    def factory(kind: EngineKind, path: Path, name: str, options: EngineOptions) -> Engine:
        engines.append(default_engine_factory(kind, path, name, options))
        return engines[-1]

    service = ServingService(
        factory,
        RegistryResolver(RegistryClient.connect(registry.address, timeout=120), tmp_path / "cache"),
        ServingMetrics(CollectorRegistry()),
        EngineShimMetrics(),
        ServingConfig(default_engine=EngineKind.TRANSFORMERS),
    )
    try:
        model_ref = ModelRef(registered.name, version=registered.version)
        info = await service.load_model(LoadRequest(ModelSource(model_ref=model_ref)))
        assert info.model is not None and info.model.version == registered.version
        (engine,) = engines
        served: Any = engine._model  # type: ignore[attr-defined]
        kinds = {f"{type(m).__module__}.{type(m).__name__}" for m in served.modules()}
        assert module_class in kinds, "not the quantized kernels"
        assert not any(type(m) is torch.nn.Linear for m in served.modules()), "a Linear left in float"

        expected = in_memory(source)
        prompt = await engine.tokenize(PROMPT)
        want_prompt_logits, want_tokens, want_logprobs = incremental_greedy(expected, prompt, NEW_TOKENS)
        got_prompt_logits, _, _ = incremental_greedy(served, prompt, 0)
        assert torch.equal(got_prompt_logits, want_prompt_logits)

        result = await service.generate(
            GenerationRequest(
                ModelSelector(model_ref=model_ref),
                Prompt(text=PROMPT),
                SamplingParams(
                    greedy=True, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0, prompt_logprobs=0
                ),
            )
        )
    finally:
        await service.close()  # closes the resolver's registry client too

    (completion,) = result.completions
    assert completion.token_ids == want_tokens
    assert [lp.logprob for lp in completion.logprobs] == pytest.approx(want_logprobs, abs=1e-4)
    want_prompt = torch.log_softmax(want_prompt_logits[:-1].float(), dim=-1)  # (prompt_len - 1, vocab)
    next_ids = torch.tensor(prompt[1:])
    got_prompt = [lp.logprob for lp in result.prompt_logprobs if lp is not None][-len(prompt) + 1 :]
    assert got_prompt == pytest.approx(want_prompt.gather(1, next_ids[:, None])[:, 0].tolist(), abs=1e-4)
    assert completion.text


async def test_an_engine_or_precision_the_format_does_not_run_is_invalid_argument(tmp_path: Path) -> None:
    from llmops.common.errors import InvalidArgument
    from llmops.serving.engines.transformers_engine import TransformersEngine

    quantizer, spec = resolve(default_quantizers(), QuantizationSpec("int8_dynamic"))
    quantizer.quantize(build_tiny_model().path, tmp_path / "int8", spec)
    engine = TransformersEngine(tmp_path / "int8", "int8", EngineOptions(dtype="bfloat16"))
    try:
        with pytest.raises(InvalidArgument, match="llmops_int8_dynamic models run on the CPU in float32"):
            await engine.start()
    finally:
        await engine.shutdown()
    from llmops.serving.engines.vllm_engine import engine_args

    with pytest.raises(InvalidArgument, match="load this one on the transformers engine") as caught:
        engine_args(tmp_path / "int8", "int8", EngineOptions())  # refused before vLLM starts
    assert caught.value.field == "engine"
