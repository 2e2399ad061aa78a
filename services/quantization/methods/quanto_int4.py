"""INT4 weight-only quantization in groups with optimum-quanto (its requantize route).

Every ``nn.Linear`` (lm_head included) gets ``qint4`` weights with one scale and shift per group of
``group_size`` input weights (-1: one group per output channel); embeddings and norms stay fp32.
The folder holds ``config.json``, ``model.safetensors`` with quanto's packed tensors and
``quanto_qmap.json``; :meth:`QuantoInt4Quantizer.load_for_eval` rebuilds the quantized structure on
the CPU and loads the packed state dict (quanto's own ``requantize`` builds on the meta device, which
leaves the rotary ``inv_freq`` buffer uninitialised). torchao's INT4 path fails on this CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmops.quantization.methods.base import (
    MARKER_FILE,
    ProgressFn,
    QuantizationSpec,
    QuantizedArtifact,
    Quantizer,
    prepare_out_dir,
)

QMAP_FILE = "quanto_qmap.json"
WEIGHTS_FILE = "model.safetensors"


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
        from optimum.quanto import (  # type: ignore[import-untyped]
            freeze,
            qint4,
            quantization_map,
            quantize,
        )
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        prepare_out_dir(out_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
        model.eval()
        quantize(model, weights=qint4)
        _set_group_size(model, None if spec.group_size == -1 else spec.group_size)
        if progress:
            progress(0.4)
        freeze(model)
        if progress:
            progress(0.8)
        model.config.save_pretrained(out_dir)
        save_file(model.state_dict(), out_dir / WEIGHTS_FILE)
        (out_dir / QMAP_FILE).write_text(json.dumps(quantization_map(model), indent=1))
        if progress:
            progress(1.0)
        return self._finish(src_dir, out_dir, spec, qmap_file=QMAP_FILE)

    def load_for_eval(self, out_dir: Path) -> Any:
        from optimum.quanto import qint4, quantize  # type: ignore[import-untyped]
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        # quanto's own ``requantize`` builds on the meta device, which leaves non-persistent buffers
        # (rotary inv_freq) uninitialised; a CPU build of the same structure avoids that.
        config = AutoConfig.from_pretrained(out_dir)
        auto: Any = AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32).eval()
        quantize(model, weights=qint4)
        _set_group_size(model, _group_size_of(out_dir))
        model.load_state_dict(load_file(out_dir / WEIGHTS_FILE))
        return model


def _group_size_of(out_dir: Path) -> int | None:
    settings = json.loads((out_dir / MARKER_FILE).read_text())
    return None if settings["group_size"] == -1 else int(settings["group_size"])


def _set_group_size(model: torch.nn.Module, group_size: int | None) -> None:
    """Set quanto's weight group size on every quantized module (read when weights are packed)."""
    module: Any
    for module in model.modules():
        if getattr(module, "weight_qtype", None) is not None:
            in_features = module.weight.shape[1]
            if group_size is not None and in_features % group_size:
                raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
            module.weight_group_size = group_size
