"""The quantized formats of our own, as ``config.json``'s ``quantization_config`` names them.

A contract between the service that writes a folder (quantization) and the one that loads it
(serving), so both read this one definition. Two layouts are ours, because no transformers
quantizer reads them (``from_pretrained`` refuses an unknown ``quant_method``): INT8 dynamic
(``llmops_int8_dynamic``, :mod:`.int8_dynamic`: ``torch.ao`` INT8 Linears, stored as int8 weights
with per-channel scales) and optimum-quanto INT4 (``llmops_quanto_int4``, :mod:`.quanto_int4`,
loaded through quanto's requantize). Each format module writes its layout and loads it back. A
loader that finds one of these names (serving's transformers engine) calls :func:`load_model`
instead of ``from_pretrained``; every other folder (torchao INT8, GPTQ, AWQ, full precision) loads
the usual way. Importing this package is cheap: the format modules (and torch) load when a folder
does.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: ``quant_method`` -> the module that writes it and whose ``load_model(folder)`` loads it.
OWN_FORMATS = {
    "llmops_int8_dynamic": "llmops.common.formats.int8_dynamic",
    "llmops_quanto_int4": "llmops.common.formats.quanto_int4",
}

#: Formats whose tensors need version counters (quanto's), which ``torch.inference_mode`` tensors
#: lack: run them under ``torch.no_grad`` instead.
NO_INFERENCE_MODE = frozenset({"llmops_quanto_int4"})


def own_quant_method(config: Mapping[str, Any]) -> str | None:
    """The ``quant_method`` of ``config`` (a parsed ``config.json``) when it is one of ours."""
    settings = config.get("quantization_config")
    method = settings.get("quant_method") if isinstance(settings, Mapping) else None
    return method if isinstance(method, str) and method in OWN_FORMATS else None


def load_model(folder: Path, method: str) -> Any:
    """The folder's model on the CPU (the unquantized rest in float32), in eval mode.

    Raises:
        ValueError: ``method`` is not ours, or the folder does not hold what its config says.
    """
    if method not in OWN_FORMATS:
        raise ValueError(f"{method!r} is not one of {', '.join(sorted(OWN_FORMATS))}")
    model = importlib.import_module(OWN_FORMATS[method]).load_model(folder)
    return model.eval()


def read_settings(folder: Path, method: str, format_version: int) -> dict[str, Any]:
    """The ``quantization_config`` of ``folder``'s ``config.json``, checked to be ``method`` at
    ``format_version``.

    Raises:
        ValueError: another method, or a format version this build does not read.
    """
    settings = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if settings.get("quant_method") != method:
        raise ValueError(f"{folder.name} is not an {method} folder")
    if settings.get("format_version") != format_version:
        raise ValueError(f"{folder.name}: unknown {method} format_version {settings.get('format_version')}")
    return dict(settings)


def write_settings(folder: Path, settings: Mapping[str, Any]) -> None:
    """Write ``settings`` as the ``quantization_config`` of ``folder/config.json``."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = dict(settings)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
