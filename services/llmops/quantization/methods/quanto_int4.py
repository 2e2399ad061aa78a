"""INT4 weight-only quantization in groups with optimum-quanto (its requantize route).

Every ``nn.Linear`` (lm_head included) gets ``qint4`` weights with one scale and shift per group of
``group_size`` input weights (-1: one group per output channel); embeddings and norms stay fp32.
The result is written in our own layout, ``llmops_quanto_int4``
(:mod:`llmops.common.formats.quanto_int4` writes and loads it; serving's transformers engine loads
it through :mod:`llmops.common.formats`). torchao's INT4 path fails on this CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmops.common.formats import quanto_int4 as int4_format
from llmops.quantization.methods.base import (
    ProgressFn,
    QuantizationSpec,
    QuantizedArtifact,
    Quantizer,
    prepare_out_dir,
)


def quantize_model(src_dir: Path, group_size: int) -> Any:
    """The model in ``src_dir`` with quanto ``qint4`` weights in groups (-1: per output channel), frozen."""
    from optimum.quanto import freeze, qint4, quantize  # type: ignore[import-untyped]
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    model.eval()
    quantize(model, weights=qint4)
    int4_format.set_group_size(model, None if group_size == -1 else group_size)
    freeze(model)  # packs the weights with the group size set above
    return model


class QuantoInt4Quantizer(Quantizer):
    """optimum-quanto ``qint4`` weights with groups of 32, 64 or 128, or per output channel."""

    name = "int4_weight_only"
    result_format = "int4"
    supported_bits = (4,)
    supported_group_sizes = (-1, 32, 64, 128)

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
        model = quantize_model(src_dir, spec.group_size)
        if progress:
            progress(0.8)
        int4_format.save_model(model, out_dir, spec.group_size)
        if progress:
            progress(1.0)
        return self._finish(src_dir, out_dir, spec, qmap_file=int4_format.QMAP_FILE)

    def load_for_eval(self, out_dir: Path) -> Any:
        return int4_format.load_model(out_dir)
