"""INT8 dynamic quantization with ``torch.ao`` (weights INT8 per channel, activations at run time).

The fastest CPU path measured here. Its modules hold packed parameters that ``save_pretrained``
cannot write, and a torch state dict would be a pickle (which the registry refuses), so the result
is written as plain safetensors, in a layout of our own that ``config.json``'s
``quantization_config`` names (``"quant_method": "llmops_int8_dynamic"``):

- ``<linear>.weight``: int8 ``(out, in)``, the quantized values (``int_repr``);
- ``<linear>.weight_scale``: float64 ``(out,)`` and ``<linear>.weight_zero_point``: int64 ``(out,)``,
  one per output channel (axis 0), exactly what ``torch.ao`` computed (zero points are 0: the grid is
  symmetric);
- ``<linear>.bias``: float32, where the Linear has one;
- every other parameter and persistent buffer (embeddings, norms) in float32, under its usual name.

:func:`load_model` builds the fp32 model from ``config.json`` and replaces each Linear named in the
file by a ``torch.ao.nn.quantized.dynamic.Linear`` holding the stored INT8 weight, so the loaded
model runs the INT8 kernels (it is never dequantized) and computes what the in-memory quantized
model computed. Serving's transformers engine loads through it (see :mod:`llmops.quantization.formats`).
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
    add_quantization_config,
    prepare_out_dir,
)

WEIGHTS_FILE = "model.safetensors"
QUANT_METHOD = "llmops_int8_dynamic"
#: ``config.json``'s ``quantization_config`` of a result (the format version guards the layout).
QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": QUANT_METHOD,
    "format_version": 1,
    "weights": {"dtype": "int8", "granularity": "per_channel", "axis": 0, "symmetric": True},
    "activations": {"dtype": "uint8", "granularity": "per_tensor", "dynamic": True},
    "modules": "every torch.nn.Linear, lm_head included",
}
_SCALE, _ZERO_POINT = ".weight_scale", ".weight_zero_point"


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


def _dynamic_linear_type() -> type[Any]:
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def to_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The safetensors content of a ``quantize_dynamic`` model (layout in the module docstring)."""
    dynamic_linear = _dynamic_linear_type()
    tensors: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    module: Any
    for name, module in model.named_modules():
        if not isinstance(module, dynamic_linear):
            continue
        weight = module.weight()  # a per-channel qint8 tensor, (out, in)
        if weight.qscheme() != torch.per_channel_affine or weight.q_per_channel_axis() != 0:
            raise ValueError(f"{name}: expected per-channel weights along axis 0, got {weight.qscheme()}")
        tensors[name + ".weight"] = weight.int_repr().contiguous()
        tensors[name + _SCALE] = weight.q_per_channel_scales().to(torch.float64).contiguous()
        tensors[name + _ZERO_POINT] = weight.q_per_channel_zero_points().to(torch.int64).contiguous()
        bias = module.bias()
        if bias is not None:
            tensors[name + ".bias"] = bias.detach().float().contiguous()
        quantized.append(name + ".")
    for key, value in model.state_dict().items():
        if not any(key.startswith(prefix) for prefix in quantized):
            tensors[key] = value.detach().contiguous()
    return tensors


def load_model(folder: Path) -> Any:
    """An ``llmops_int8_dynamic`` folder as a CPU causal LM running ``torch.ao``'s INT8 Linears.

    Raises:
        ValueError: the folder is not in this format, or its tensors do not fit its config.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmops.quantization.formats import read_settings

    read_settings(folder, QUANT_METHOD, QUANTIZATION_CONFIG["format_version"])
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):  # no transformers quantizer knows our method
        del config.quantization_config
    auto: Any = AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32).eval()
    tensors = load_file(folder / WEIGHTS_FILE)
    names = sorted(key[: -len(_SCALE)] for key in tensors if key.endswith(_SCALE))
    quantized = {
        name: (tensors.pop(name + ".weight"), tensors.pop(name + _SCALE), tensors.pop(name + _ZERO_POINT))
        for name in names
    }
    biases = {name: tensors.pop(name + ".bias", None) for name in names}
    # the fp32 rest first: a torch.ao Linear expects its own state keys, which the file has not
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in quantized]
    if missing or unexpected:
        raise ValueError(f"{folder.name}: tensors missing {missing[:3]} or unexpected {unexpected[:3]}")
    dynamic_linear = _dynamic_linear_type()
    for name, (int8, scales, zero_points) in quantized.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear) or tuple(int8.shape) != tuple(linear.weight.shape):
            raise ValueError(f"{folder.name}: {name} is not a Linear of shape {list(int8.shape)}")
        bias = biases[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(int8, scales, zero_points, 0)  # (out, in)
            module: Any = dynamic_linear(
                linear.in_features, linear.out_features, bias_=bias is not None, dtype=torch.qint8
            )
            module.set_weight_bias(qweight, bias)
        model.set_submodule(name, module)
    return model


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
        from safetensors.torch import save_file

        prepare_out_dir(out_dir)
        if progress:
            progress(0.1)
        quantized = quantize_model(src_dir)
        if progress:
            progress(0.8)
        quantized.config.save_pretrained(out_dir)
        add_quantization_config(out_dir, QUANTIZATION_CONFIG)
        save_file(to_tensors(quantized), out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        if progress:
            progress(1.0)
        return self._finish(src_dir, out_dir, spec, weights_file=WEIGHTS_FILE)

    def load_for_eval(self, out_dir: Path) -> Any:
        return load_model(out_dir)
