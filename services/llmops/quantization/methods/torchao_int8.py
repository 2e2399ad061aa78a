"""INT8 weight-only quantization per output channel with torchao, through ``TorchAoConfig``.

The result round-trips through ``save_pretrained`` / ``from_pretrained``: ``config.json`` carries
the ``quantization_config`` and any transformers loader with torchao installed reads it back.
(torchao's INT4 weight-only path fails on this CPU, so INT4 goes through optimum-quanto instead.)
"""

from __future__ import annotations

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


class TorchAoInt8WeightOnlyQuantizer(Quantizer):
    """torchao ``Int8WeightOnlyConfig`` applied while loading, then ``save_pretrained``."""

    name = "int8_weight_only"
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
        from torchao.quantization import Int8WeightOnlyConfig  # type: ignore[import-untyped]
        from transformers import AutoModelForCausalLM, TorchAoConfig

        prepare_out_dir(out_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(
            src_dir, dtype=torch.float32, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
        )
        if progress:
            progress(0.7)
        # torchao tensor subclasses are not plain safetensors tensors; transformers writes them
        # through its torchao serializer either way, so the default format is kept.
        model.save_pretrained(out_dir)
        if progress:
            progress(1.0)
        return self._finish(src_dir, out_dir, spec)

    def load_for_eval(self, out_dir: Path) -> Any:
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(out_dir)
        return model.eval()
