"""INT8 dynamic quantization with ``torch.ao`` (weights INT8 per channel, activations at run time).

The fastest CPU path measured here. The result is written in our own safetensors layout,
``llmops_int8_dynamic`` (:mod:`llmops.common.formats.int8_dynamic` writes and loads it; serving's
transformers engine loads it through :mod:`llmops.common.formats`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmops.common.formats import int8_dynamic as int8_format
from llmops.quantization.methods.base import (
    ProgressFn,
    QuantizationSpec,
    QuantizedArtifact,
    Quantizer,
    prepare_out_dir,
)


def _quantize_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch.ao quantization is deprecated upstream but still the fast path
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantized: torch.nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )
    return quantized


def quantize_model(src_dir: Path) -> Any:
    """The model in ``src_dir`` with every ``nn.Linear`` made a ``torch.ao`` dynamic INT8 Linear."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    return _quantize_dynamic(model.eval())


class Int8DynamicQuantizer(Quantizer):
    """``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (lm_head included)."""

    name = "int8_dynamic"
    result_format = "int8"
    supported_bits = (8,)

    def quantize(
        self,
        src_dir: Path,
        out_dir: Path,
        spec: QuantizationSpec,
        calibration: Sequence[torch.Tensor] | None = None,
        progress: ProgressFn | None = None,
    ) -> QuantizedArtifact:
        prepare_out_dir(out_dir)
        if progress:
            progress(0.1)
        quantized = quantize_model(src_dir)
        if progress:
            progress(0.8)
        int8_format.save_model(quantized, out_dir)
        if progress:
            progress(1.0)
        return self._finish(src_dir, out_dir, spec, weights_file=int8_format.WEIGHTS_FILE)

    def load_for_eval(self, out_dir: Path) -> Any:
        return int8_format.load_model(out_dir)
