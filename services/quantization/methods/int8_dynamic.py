"""INT8 dynamic quantization with ``torch.ao`` (weights INT8 per channel, activations at run time).

The fastest CPU path measured here, but its modules hold packed parameters that
``save_pretrained`` cannot write: the result is ``config.json`` plus a state dict
(``model_int8_dynamic.pt``, readable with ``torch.load(weights_only=True)``), and
:meth:`Int8DynamicQuantizer.load_for_eval` rebuilds the model from the config, applies the same
quantization to the empty model and loads the state dict into it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmops.quantization.methods.base import (
    ProgressFn,
    QuantizationSpec,
    QuantizedArtifact,
    Quantizer,
    prepare_out_dir,
)

STATE_DICT_FILE = "model_int8_dynamic.pt"


def _quantize_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch.ao quantization is deprecated upstream but still the fast path
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantized: torch.nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )
    return quantized


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
        from transformers import AutoModelForCausalLM

        prepare_out_dir(out_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
        if progress:
            progress(0.3)
        quantized = _quantize_dynamic(model.eval())
        if progress:
            progress(0.8)
        model.config.save_pretrained(out_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(quantized.state_dict(), out_dir / STATE_DICT_FILE)
        if progress:
            progress(1.0)
        return self._finish(src_dir, out_dir, spec, weights_file=STATE_DICT_FILE)

    def load_for_eval(self, out_dir: Path) -> Any:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(out_dir)
        auto: Any = AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32).eval()
        quantized = _quantize_dynamic(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(out_dir / STATE_DICT_FILE, weights_only=True)
        quantized.load_state_dict(state)
        return quantized
