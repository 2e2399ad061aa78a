"""The ``llmops_quanto_int4`` layout: optimum-quanto ``qint4`` Linears in groups.

The folder holds ``config.json``, ``model.safetensors`` with quanto's packed tensors and
``quanto_qmap.json`` (quanto's quantization map: which module has which weight type).
``config.json``'s ``quantization_config`` names our method (``"quant_method": "llmops_quanto_int4"``,
with the group size and the map's file): transformers' own quanto integration does not serialize
(its quantizer says ``is_serializable() == False``), so no transformers loader claims the folder.

:func:`load_model` builds the fp32 model on the CPU, has ``optimum.quanto.requantize`` quantize the
modules the map names, sets the group size (quanto's map does not record it, and the packed shapes
depend on it) and loads the packed state dict strictly. (quanto's ``requantize`` given a model on the
meta device would leave the rotary ``inv_freq`` buffer uninitialised: hence the CPU build.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmops.common.formats import read_settings, write_settings

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


def set_group_size(model: torch.nn.Module, group_size: int | None) -> None:
    """Set quanto's weight group size on every quantized module (read when weights are packed)."""
    module: Any
    for module in model.modules():
        if getattr(module, "weight_qtype", None) is not None:
            in_features = module.weight.shape[1]
            if group_size is not None and in_features % group_size:
                raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
            module.weight_group_size = group_size


def save_model(model: Any, folder: Path, group_size: int) -> None:
    """Write a frozen quanto ``qint4`` causal LM (packed with ``group_size``) to ``folder``."""
    from optimum.quanto import quantization_map  # type: ignore[import-untyped]
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    write_settings(folder, quantization_config(group_size))
    save_file(model.state_dict(), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / QMAP_FILE).write_text(json.dumps(quantization_map(model), indent=1))


def load_model(folder: Path) -> Any:
    """An ``llmops_quanto_int4`` folder as a CPU causal LM with quanto's INT4 Linears.

    Raises:
        ValueError: the folder is not in this format, or its tensors do not fit its config.
    """
    from optimum.quanto import requantize  # type: ignore[import-untyped]
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

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
    set_group_size(model, None if group_size == -1 else group_size)
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))  # strict: every packed tensor is used
    return model
