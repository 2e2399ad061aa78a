"""Our own quantized formats (INT8 dynamic, quanto INT4) are safe, self-describing folders that load
back into the quantized modules and compute exactly what the in-memory quantized model computes.

Invariants: the folder holds safetensors and JSON only (nothing a loader would unpickle);
``config.json``'s ``quantization_config`` names our method, which :mod:`llmops.common.formats`
recognises (and nothing else); loading rebuilds ``torch.ao`` dynamic INT8 Linears / quanto INT4
Linears (never a float copy) whose logits equal the in-memory model's; a folder of another method is
refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmops.common import formats
from llmops.common.formats import int8_dynamic as int8_format
from llmops.common.formats import quanto_int4 as int4_format
from llmops.quantization.methods import (
    QuantizationSpec,
    default_quantizers,
    int8_dynamic,
    quanto_int4,
    resolve,
)

IDS = torch.tensor([[5, 17, 300, 42, 99, 1000, 7, 3000]])
#: case -> (spec, quant_method, class of the loaded Linears, in-memory model builder)
CASES: dict[str, tuple[QuantizationSpec, str, str, Any]] = {
    "int8_dynamic": (
        QuantizationSpec("int8_dynamic"),
        int8_format.QUANT_METHOD,
        "torch.ao.nn.quantized.dynamic.modules.linear.Linear",
        int8_dynamic.quantize_model,
    ),
    "int4_g32": (
        QuantizationSpec("int4_weight_only", group_size=32),
        int4_format.QUANT_METHOD,
        "optimum.quanto.nn.qlinear.QLinear",
        lambda src: quanto_int4.quantize_model(src, 32),
    ),
    "int4_per_channel": (
        QuantizationSpec("int4_weight_only", group_size=-1),
        int4_format.QUANT_METHOD,
        "optimum.quanto.nn.qlinear.QLinear",
        lambda src: quanto_int4.quantize_model(src, -1),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def written(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    quantizer, spec = resolve(default_quantizers(), CASES[request.param][0])
    out = tmp_path_factory.mktemp(request.param) / "out"
    quantizer.quantize(tiny_model_dir, out, spec)
    return request.param, out


def test_the_folder_holds_only_safetensors_and_json(written: tuple[str, Path]) -> None:
    _, folder = written
    suffixes = {p.suffix for p in folder.iterdir()}
    assert suffixes <= {".safetensors", ".json", ".jinja"}, suffixes


def test_the_config_names_our_method_and_formats_recognises_it(written: tuple[str, Path]) -> None:
    case, folder = written
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == CASES[case][1]
    assert formats.own_quant_method(config) == CASES[case][1]


def test_the_loaded_model_runs_the_quantized_modules_and_equals_the_in_memory_one(
    written: tuple[str, Path], tiny_model_dir: Path
) -> None:
    case, folder = written
    _, method, linear_class, in_memory = CASES[case]
    loaded = formats.load_model(folder, method)
    kinds = {f"{type(m).__module__}.{type(m).__name__}" for m in loaded.modules()}
    assert linear_class in kinds and not any(type(m) is torch.nn.Linear for m in loaded.modules())
    with torch.no_grad():  # not inference_mode: quanto tensors need version counters
        assert torch.equal(loaded(input_ids=IDS).logits, in_memory(tiny_model_dir)(input_ids=IDS).logits)


def test_a_folder_of_another_method_is_refused(written: tuple[str, Path]) -> None:
    case, folder = written
    other = next(m for m in formats.OWN_FORMATS if m != CASES[case][1])
    with pytest.raises(ValueError, match="is not an"):
        formats.load_model(folder, other)
    with pytest.raises(ValueError, match="is not one of"):
        formats.load_model(folder, "gptq")


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"quantization_config": None},
        {"quantization_config": {"quant_method": "gptq"}},
        {"quantization_config": {"quant_method": "torchao"}},
        {"quantization_config": "llmops_int8_dynamic"},
    ],
)
def test_other_configs_are_not_ours(config: dict[str, Any]) -> None:
    assert formats.own_quant_method(config) is None


def test_every_own_format_names_the_module_that_writes_it() -> None:
    import importlib

    for method, module in formats.OWN_FORMATS.items():
        assert method == importlib.import_module(module).QUANT_METHOD
