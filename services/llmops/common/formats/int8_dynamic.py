"""The ``llmops_int8_dynamic`` layout: ``torch.ao`` dynamic INT8 Linears as plain safetensors.

Their modules hold packed parameters that ``save_pretrained`` cannot write, and a torch state dict
would be a pickle (which the registry refuses), so the model is written as plain safetensors, in a
layout of our own that ``config.json``'s ``quantization_config`` names
(``"quant_method": "llmops_int8_dynamic"``):

- ``<linear>.weight``: int8 ``(out, in)``, the quantized values (``int_repr``);
- ``<linear>.weight_scale``: float64 ``(out,)`` and ``<linear>.weight_zero_point``: int64 ``(out,)``,
  one per output channel (axis 0), exactly what ``torch.ao`` computed (zero points are 0: the grid is
  symmetric);
- ``<linear>.bias``: float32, where the Linear has one;
- every other parameter and persistent buffer (embeddings, norms) in float32, under its usual name.

:func:`save_model` writes a ``quantize_dynamic`` model so; :func:`load_model` builds the fp32 model
from ``config.json`` and replaces each Linear named in the file by a
``torch.ao.nn.quantized.dynamic.Linear`` holding the stored INT8 weight, so the loaded model runs
the INT8 kernels (it is never dequantized) and computes what the in-memory quantized model computed.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from llmops.common.formats import read_settings, write_settings

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


def save_model(model: Any, folder: Path) -> None:
    """Write a ``quantize_dynamic`` causal LM to ``folder``: ``config.json`` naming this format and
    the safetensors of :func:`to_tensors`."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    write_settings(folder, QUANTIZATION_CONFIG)
    save_file(to_tensors(model), folder / WEIGHTS_FILE, metadata={"format": "pt"})


def load_model(folder: Path) -> Any:
    """An ``llmops_int8_dynamic`` folder as a CPU causal LM running ``torch.ao``'s INT8 Linears.

    Raises:
        ValueError: the folder is not in this format, or its tensors do not fit its config.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

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
