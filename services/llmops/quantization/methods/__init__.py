"""Quantization methods by name."""

from __future__ import annotations

from collections.abc import Mapping

from llmops.common.errors import InvalidArgument
from llmops.quantization.methods.awq import AwqQuantizer
from llmops.quantization.methods.base import (
    CalibrationSpec,
    QuantizationSpec,
    QuantizedArtifact,
    Quantizer,
)
from llmops.quantization.methods.gguf_export import GgufQuantizer
from llmops.quantization.methods.gptq import GptqQuantizer
from llmops.quantization.methods.int8_dynamic import Int8DynamicQuantizer
from llmops.quantization.methods.quanto_int4 import QuantoInt4Quantizer
from llmops.quantization.methods.torchao_int8 import TorchAoInt8WeightOnlyQuantizer

__all__ = [
    "CalibrationSpec",
    "QuantizationSpec",
    "QuantizedArtifact",
    "Quantizer",
    "default_quantizers",
    "resolve",
]


def default_quantizers() -> dict[str, Quantizer]:
    """Every method that runs on this machine, by name.

    GPTQ and AWQ are this project's own implementations of the published algorithms (no GPTQ/AWQ
    library runs on this CPU stack; see ``methods/gptq.py`` and ``methods/awq.py``).
    """
    methods: list[Quantizer] = [
        Int8DynamicQuantizer(),
        TorchAoInt8WeightOnlyQuantizer(),
        QuantoInt4Quantizer(),
        GptqQuantizer(),
        AwqQuantizer(),
        GgufQuantizer(),
    ]
    return {m.name: m for m in methods}


def resolve(
    quantizers: Mapping[str, Quantizer], spec: QuantizationSpec
) -> tuple[Quantizer, QuantizationSpec]:
    """The quantizer for ``spec.method`` and the spec with defaults filled in.

    Raises:
        InvalidArgument: an unknown method, or a bad combination for it (GPTQ/AWQ without
            calibration included); the message names what is supported.
    """
    supported = ", ".join(sorted(quantizers))
    quantizer = quantizers.get(spec.method)
    if quantizer is None:
        raise InvalidArgument(f"unknown method {spec.method!r}; supported here: {supported}", field="method")
    return quantizer, quantizer.validate(spec)
