"""INT4 weight-only quantization in groups with optimum-quanto (its requantize route).

Every ``nn.Linear`` (lm_head included) gets ``qint4`` weights with one scale and shift per group of
``group_size`` input weights (-1: one group per output channel); embeddings and norms stay fp32.
The folder holds ``config.json``, ``model.safetensors`` with quanto's packed tensors and
``quanto_qmap.json`` (quanto's quantization map: which module has which weight type).
``config.json``'s ``quantization_config`` names our method (``"quant_method": "llmops_quanto_int4"``,
with the group size and the map's file): transformers' own quanto integration does not serialize
(its quantizer says ``is_serializable() == False``), so no transformers loader claims the folder, and serving's transformers engine loads
it through :func:`load_model` (see :mod:`llmops.quantization.formats`).

:func:`load_model` builds the fp32 model on the CPU, has ``optimum.quanto.requantize`` quantize the
modules the map names, sets the group size (quanto's map does not record it, and the packed shapes
depend on it) and loads the packed state dict strictly. (quanto's ``requantize`` given a model on the
meta device would leave the rotary ``inv_freq`` buffer uninitialised: hence the CPU build.)
torchao's INT4 path fails on this CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmops.quantization.methods.base import (
    ProgressFn,
    QuantizationSpec,
    QuantizedArtifact,
    Quantizer,
    add_quantization_config,
    prepare_out_dir,
)

QMAP_FILE = "quanto_qmap.json"
WEIGHTS_FILE = "model.safetensors"
QUANT_METHOD = "llmops_quanto_int4"
FORMAT_VERSION = 1


def quantization_config(group_size: int) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` of a result (``group_size`` -1: per output channel)."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "weights": "qint4",
        "group_size": group_size,
        "quantization_map": QMAP_FILE,
        "modules": "every torch.nn.Linear, lm_head included",
    }


def quantize_model(src_dir: Path, group_size: int) -> Any:
    """The model in ``src_dir`` with quanto ``qint4`` weights in groups (-1: per output channel), frozen."""
    from optimum.quanto import freeze, qint4, quantize  # type: ignore[import-untyped]
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    model.eval()
    quantize(model, weights=qint4)
    _set_group_size(model, None if group_size == -1 else group_size)
    freeze(model)  # packs the weights with the group size set above
    return model


def load_model(folder: Path) -> Any:
    """An ``llmops_quanto_int4`` folder as a CPU causal LM with quanto's INT4 Linears.

    Raises:
        ValueError: the folder is not in this format, or its tensors do not fit its config.
    """
    from optimum.quanto import requantize  # type: ignore[import-untyped]
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmops.quantization.formats import read_settings

    settings = read_settings(folder, QUANT_METHOD, FORMAT_VERSION)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):  # transformers' quanto loader cannot read saved weights
        del config.quantization_config
    auto: Any = AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32).eval()
    qmap_name = str(settings.get("quantization_map") or QMAP_FILE)
    if Path(qmap_name).name != qmap_name:  # a file of the folder, never a path out of it
        raise ValueError(f"{folder.name}: quantization_map must be a file name, not {qmap_name!r}")
    qmap = json.loads((folder / qmap_name).read_text())
    requantize(model, {}, qmap, device=torch.device("cpu"))  # quantize the mapped modules, load nothing
    group_size = int(settings["group_size"])
    _set_group_size(model, None if group_size == -1 else group_size)
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))  # strict: every packed tensor is used
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
        from optimum.quanto import quantization_map  # type: ignore[import-untyped]
        from safetensors.torch import save_file

        prepare_out_dir(out_dir)
        if progress:
            progress(0.1)
        model = quantize_model(src_dir, spec.group_size)
        if progress:
            progress(0.8)
        model.config.save_pretrained(out_dir)
        add_quantization_config(out_dir, quantization_config(spec.group_size))
        save_file(model.state_dict(), out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        (out_dir / QMAP_FILE).write_text(json.dumps(quantization_map(model), indent=1))
        if progress:
            progress(1.0)
        return self._finish(src_dir, out_dir, spec, qmap_file=QMAP_FILE)

    def load_for_eval(self, out_dir: Path) -> Any:
        return load_model(out_dir)


def _set_group_size(model: torch.nn.Module, group_size: int | None) -> None:
    """Set quanto's weight group size on every quantized module (read when weights are packed)."""
    module: Any
    for module in model.modules():
        if getattr(module, "weight_qtype", None) is not None:
            in_features = module.weight.shape[1]
            if group_size is not None and in_features % group_size:
                raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
            module.weight_group_size = group_size
