"""Quantization methods by name, and the methods the platform knows but cannot run here."""

from __future__ import annotations

from collections.abc import Mapping

from llmops.common.errors import InvalidArgument
from llmops.quantization.methods.base import QuantizationSpec, QuantizedArtifact, Quantizer
from llmops.quantization.methods.gguf_export import GgufQuantizer
from llmops.quantization.methods.int8_dynamic import Int8DynamicQuantizer
from llmops.quantization.methods.quanto_int4 import QuantoInt4Quantizer
from llmops.quantization.methods.torchao_int8 import TorchAoInt8WeightOnlyQuantizer

__all__ = ["QuantizationSpec", "QuantizedArtifact", "Quantizer", "default_quantizers", "resolve"]

#: Calibrated methods with no library that runs on this CPU (llm-compressor / GPTQModel / AutoAWQ
#: need CUDA); rejected with a message rather than half-implemented.
UNAVAILABLE = {
    "gptq": "GPTQ needs a GPU and a GPTQ library (llm-compressor or GPTQModel), not available here",
    "awq": "AWQ needs a GPU and an AWQ library (llm-compressor or AutoAWQ), not available here",
}


def default_quantizers() -> dict[str, Quantizer]:
    """Every method that runs on this machine, by name."""
    methods: list[Quantizer] = [
        Int8DynamicQuantizer(),
        TorchAoInt8WeightOnlyQuantizer(),
        QuantoInt4Quantizer(),
        GgufQuantizer(),
    ]
    return {m.name: m for m in methods}


def resolve(
    quantizers: Mapping[str, Quantizer], spec: QuantizationSpec
) -> tuple[Quantizer, QuantizationSpec]:
    """The quantizer for ``spec.method`` and the spec with defaults filled in.

    Raises:
        InvalidArgument: an unknown or unavailable method, or a bad combination for it; the message
            names what is supported.
    """
    supported = ", ".join(sorted(quantizers))
    if spec.method in UNAVAILABLE and spec.method not in quantizers:
        raise InvalidArgument(f"{UNAVAILABLE[spec.method]}; supported here: {supported}", field="method")
    quantizer = quantizers.get(spec.method)
    if quantizer is None:
        raise InvalidArgument(f"unknown method {spec.method!r}; supported here: {supported}", field="method")
    return quantizer, quantizer.validate(spec)
