"""A directory is registered only if it is a loadable model of the format it claims.

Invariants: pickle files are refused anywhere; full-weight versions need a config transformers
understands, a tokenizer, and safetensors whose tensor names and shapes are exactly the config's
model (missing, extra, reshaped or truncated tensors are caught from the headers alone) in the
declared dtype; adapters need a PEFT config whose rank matches the weights; GGUF needs its magic.
Each refusal names the reason.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llmops.common.artifacts.manifest import scan_directory
from llmops.common.errors import InvalidArgument
from llmops.registry.domain import ModelFormat
from llmops.registry.validation import validate_artifact
from tests.registry_support import write_adapter, write_gguf, write_llama


def _validate(folder: Path, fmt: ModelFormat = ModelFormat.FP32) -> int:
    return validate_artifact(folder, scan_directory(folder), fmt).parameter_count


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def test_valid_models_pass_with_their_parameter_count(tmp_path: Path) -> None:
    assert _validate(write_llama(tmp_path / "tied")) == 22688
    untied = write_llama(tmp_path / "untied", tie=False)
    assert _validate(untied) == 22688 + 128 * 32
    assert _validate(write_llama(tmp_path / "sharded", shards=3)) == 22688
    assert _validate(write_llama(tmp_path / "half", dtype="float16"), ModelFormat.FP16) == 22688


BROKEN: list[tuple[str, Callable[[Path], object], ModelFormat, str]] = [
    ("no config", lambda d: (d / "config.json").unlink(), ModelFormat.FP32, r"config\.json is missing"),
    ("pickle", lambda d: (d / "pytorch_model.bin").write_bytes(b"\x80\x04"), ModelFormat.FP32, "pickle"),
    ("no tokenizer", lambda d: (d / "tokenizer.json").unlink(), ModelFormat.FP32, "no tokenizer"),
    ("no weights", lambda d: (d / "model.safetensors").unlink(), ModelFormat.FP32, "no safetensors"),
    ("reshaped", lambda d: _edit_config(d, intermediate_size=96), ModelFormat.FP32, "do not match"),
    ("too few layers", lambda d: _edit_config(d, num_hidden_layers=3), ModelFormat.FP32, "missing"),
    ("too many layers", lambda d: _edit_config(d, num_hidden_layers=1), ModelFormat.FP32, "not in config"),
    (
        "untied head missing",
        lambda d: _edit_config(d, tie_word_embeddings=False),
        ModelFormat.FP32,
        "lm_head",
    ),
    ("truncated", _truncate, ModelFormat.FP32, "outside the file"),
    (
        "garbage",
        lambda d: (d / "model.safetensors").write_bytes(b"hello"),
        ModelFormat.FP32,
        "not a safetensors",
    ),
    (
        "unknown type",
        lambda d: _edit_config(d, model_type="nonesuch"),
        ModelFormat.FP32,
        "transformers can load",
    ),
    ("wrong dtype", lambda d: None, ModelFormat.BF16, "mostly F32"),
    ("int8 without quant config", lambda d: None, ModelFormat.INT8, "quantization_config"),
    ("bad json", lambda d: (d / "config.json").write_text("{"), ModelFormat.FP32, "not valid JSON"),
]


@pytest.mark.parametrize(("case", "damage", "fmt", "reason"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_models_are_refused_with_the_reason(
    tmp_path: Path, case: str, damage: Callable[[Path], object], fmt: ModelFormat, reason: str
) -> None:
    folder = write_llama(tmp_path / "model")
    damage(folder)
    with pytest.raises(InvalidArgument, match=reason):
        _validate(folder, fmt)


def test_sharded_model_with_a_missing_shard_is_refused(tmp_path: Path) -> None:
    folder = write_llama(tmp_path / "model", shards=2)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(InvalidArgument, match="shards"):
        _validate(folder)


def test_quantized_model_needs_only_its_quantization_config(tmp_path: Path) -> None:
    folder = write_llama(tmp_path / "model")
    _edit_config(folder, quantization_config={"quant_method": "quanto", "weights": "int8"})
    assert _validate(folder, ModelFormat.INT8) == 0


def test_adapters(tmp_path: Path) -> None:
    assert _validate(write_adapter(tmp_path / "ok"), ModelFormat.ADAPTER) > 0
    wrong_rank = write_adapter(tmp_path / "rank")
    config = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(InvalidArgument, match="r=8"):
        _validate(wrong_rank, ModelFormat.ADAPTER)
    no_config = write_adapter(tmp_path / "noconfig")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(InvalidArgument, match=r"adapter_config\.json is missing"):
        _validate(no_config, ModelFormat.ADAPTER)
    with pytest.raises(InvalidArgument, match=r"adapter_config\.json is missing"):
        _validate(write_llama(tmp_path / "full"), ModelFormat.ADAPTER)


def test_gguf(tmp_path: Path) -> None:
    assert _validate(write_gguf(tmp_path / "ok"), ModelFormat.GGUF) == 0
    with pytest.raises(InvalidArgument, match="magic"):
        _validate(write_gguf(tmp_path / "magic", magic=b"GGML"), ModelFormat.GGUF)
    with pytest.raises(InvalidArgument, match="version 9"):
        _validate(write_gguf(tmp_path / "version", version=9), ModelFormat.GGUF)
    two = write_gguf(tmp_path / "two")
    shutil.copy(two / "model.gguf", two / "other.gguf")
    with pytest.raises(InvalidArgument, match="exactly one"):
        _validate(two, ModelFormat.GGUF)
