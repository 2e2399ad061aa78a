"""Every quantization method writes a folder that loads back, generates, is smaller than the
fp32 source by the method's expected margin, and keeps perplexity finite and close to the source's.

One conformance table runs against every implementation; each method runs once per session.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from llmops.common.errors import FailedPrecondition
from llmops.quantization.methods import QuantizationSpec, QuantizedArtifact, default_quantizers, resolve
from llmops.quantization.methods.base import MARKER_FILE, ensure_not_quantized, weight_bytes

# (spec, largest allowed size ratio, largest allowed relative perplexity increase)
CASES = {
    "int8_dynamic": (QuantizationSpec("int8_dynamic"), 0.36, 0.02),
    "int8_weight_only": (QuantizationSpec("int8_weight_only"), 0.45, 0.02),
    "int4_g128": (QuantizationSpec("int4_weight_only"), 0.26, 0.05),
    "gguf_q8_0": (QuantizationSpec("gguf"), 0.28, 0.02),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def quantized(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, QuantizedArtifact, Any]:
    spec, _, _ = CASES[request.param]
    quantizer, checked = resolve(default_quantizers(), spec)
    out_dir = tmp_path_factory.mktemp(request.param) / "out"
    fractions: list[float] = []
    artifact = quantizer.quantize(tiny_model_dir, out_dir, checked, progress=fractions.append)
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    return request.param, artifact, quantizer.load_for_eval(out_dir)


def test_result_is_smaller_by_the_expected_margin(
    quantized: tuple[str, QuantizedArtifact, Any], tiny_model_dir: Path
) -> None:
    case, artifact, _ = quantized
    ratio = artifact.size_bytes / weight_bytes(tiny_model_dir)
    assert 0 < ratio <= CASES[case][1], f"{case}: size ratio {ratio:.3f}"
    assert artifact.size_bytes == weight_bytes(artifact.path)


def test_perplexity_stays_finite_and_close(
    quantized: tuple[str, QuantizedArtifact, Any], heldout_windows: list[torch.Tensor], fp32_perplexity: float
) -> None:
    from llmops.quantization.evaluate import perplexity

    case, _, model = quantized
    after = perplexity(model, heldout_windows)
    assert math.isfinite(after)
    assert abs(after / fp32_perplexity - 1) <= CASES[case][2], f"{case}: {fp32_perplexity:.1f} -> {after:.1f}"


def test_loaded_result_generates(quantized: tuple[str, QuantizedArtifact, Any], tokenizer: Any) -> None:
    _, _, model = quantized
    inputs = tokenizer("import os\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert new.shape == (12,)
    assert int(new.max()) < tokenizer.vocab_size + len(tokenizer.get_added_vocab())
    assert isinstance(tokenizer.decode(new), str)


def test_result_folder_is_self_describing(quantized: tuple[str, QuantizedArtifact, Any]) -> None:
    _, artifact, _ = quantized
    marker = json.loads((artifact.path / MARKER_FILE).read_text())
    assert marker["method"] == artifact.method
    assert (artifact.path / "tokenizer.json").is_file()
    assert (artifact.path / "config.json").is_file()


def test_quantizing_a_result_again_is_a_failed_precondition(
    quantized: tuple[str, QuantizedArtifact, Any],
) -> None:
    _, artifact, _ = quantized
    with pytest.raises(FailedPrecondition, match="already quantized"):
        ensure_not_quantized(artifact.path)


def test_output_folder_with_files_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    quantizer, spec = resolve(default_quantizers(), QuantizationSpec("int8_dynamic"))
    with pytest.raises(FailedPrecondition, match="not empty"):
        quantizer.quantize(tiny_model_dir, tmp_path, spec)


def test_smaller_int4_groups_store_one_scale_per_group(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    quantizer, spec = resolve(default_quantizers(), QuantizationSpec("int4_weight_only", group_size=32))
    artifact = quantizer.quantize(tiny_model_dir, tmp_path / "g32", spec)
    with safe_open(str(artifact.path / "model.safetensors"), framework="pt") as weights:
        scale = weights.get_tensor("model.layers.0.mlp.down_proj.weight._scale")
        weight = weights.get_tensor("model.layers.0.mlp.down_proj.weight._data._data")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    out_features, in_features = config["hidden_size"], config["intermediate_size"]
    assert scale.numel() == out_features * in_features // 32
    assert weight.numel() * weight.element_size() == out_features * in_features // 2  # two weights a byte
    assert 0.249 < artifact.size_bytes / weight_bytes(tiny_model_dir) <= 0.30
