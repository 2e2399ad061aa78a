"""Unsupported method/format/device combinations are INVALID_ARGUMENT naming the offending field
and what is supported; calibrated methods (GPTQ, AWQ) without calibration data say so."""

from __future__ import annotations

import pytest

from llmops.common.errors import InvalidArgument
from llmops.quantization.methods import QuantizationSpec, default_quantizers, resolve


@pytest.mark.parametrize(
    ("spec", "field", "mentions"),
    [
        (QuantizationSpec("fp2"), "method", "int8_dynamic"),
        (QuantizationSpec("gptq"), "calibration", "needs calibration data"),
        (QuantizationSpec("awq"), "calibration", "needs calibration data"),
        (QuantizationSpec("int8_dynamic", bits=4), "bits", "8"),
        (QuantizationSpec("int4_weight_only", bits=8), "bits", "4"),
        (QuantizationSpec("int4_weight_only", group_size=48), "group_size", "32, 64, 128"),
        (QuantizationSpec("int8_weight_only", group_size=32), "group_size", "no group_size"),
        (QuantizationSpec("int8_dynamic", device="cuda"), "device", "cpu"),
        (QuantizationSpec("int8_dynamic", gguf_type="Q8_0"), "gguf_type", "only for the gguf"),
        (QuantizationSpec("gguf", gguf_type="Q5_K_M"), "gguf_type", "Q8_0, Q4_0, F16, F32"),
    ],
)
def test_bad_combination_names_what_is_supported(spec: QuantizationSpec, field: str, mentions: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(default_quantizers(), spec)
    assert caught.value.field == field
    assert mentions in caught.value.message


@pytest.mark.parametrize(
    ("spec", "bits", "group_size", "gguf_type"),
    [
        (QuantizationSpec("int8_dynamic"), 8, 0, ""),
        (QuantizationSpec("int4_weight_only"), 4, 128, ""),
        (QuantizationSpec("int4_weight_only", group_size=-1), 4, -1, ""),
        (QuantizationSpec("gguf", bits=8), 0, 0, "Q8_0"),
    ],
)
def test_defaults_are_filled_in(spec: QuantizationSpec, bits: int, group_size: int, gguf_type: str) -> None:
    _, checked = resolve(default_quantizers(), spec)
    assert (checked.bits, checked.group_size, checked.gguf_type) == (bits, group_size, gguf_type)
