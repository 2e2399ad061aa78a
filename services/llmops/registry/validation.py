"""Checks that an uploaded directory is a loadable model of the format it claims.

- Never pickle: ``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.ckpt`` files are refused anywhere
  (loading them runs arbitrary code); weights must be safetensors (or GGUF).
- Full weights (fp32/bf16/fp16): ``config.json`` that transformers understands, a tokenizer, and
  safetensors whose tensor names and shapes are exactly the model's parameters for that config
  (read from the safetensors headers and a model built on the ``meta`` device — no weights loaded),
  in the declared dtype. Sharded checkpoints (``model.safetensors.index.json``) are checked whole.
- Quantized (int8/int4): ``config.json`` with a ``quantization_config`` and safetensors weights
  (packed shapes differ from the config's, so names and shapes are not compared).
- Adapter: ``adapter_config.json`` (PEFT) and ``adapter_model.safetensors``; LoRA ranks match ``r``.
- GGUF: exactly one ``.gguf`` file with the GGUF magic and a known version.

Every safetensors header is checked against the file size, so a truncated file is caught here.
Every failure is ``InvalidArgument`` with the reason.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.common.artifacts.manifest import local_path
from llmops.common.errors import InvalidArgument
from llmops.registry.domain import ModelFormat

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Bytes per element of each safetensors dtype (sub-byte and unknown types are not size-checked).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip
FORMAT_DTYPE = {ModelFormat.FP32: "F32", ModelFormat.BF16: "BF16", ModelFormat.FP16: "F16"}
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ArtifactReport:
    """What validation learned: the parameter count (0 when it cannot be known from the files)."""

    parameter_count: int


def validate_artifact(root: Path, paths: Sequence[str], fmt: ModelFormat) -> ArtifactReport:
    """Check the directory ``root`` holding ``paths`` is a loadable model of format ``fmt``.

    Raises:
        InvalidArgument: naming what is wrong.
    """
    if not paths:
        raise InvalidArgument("the artifact has no files")
    pickles = [p for p in paths if Path(p).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise InvalidArgument(
            f"pickle files are not accepted ({', '.join(sorted(pickles)[:5])}): save weights as safetensors"
        )
    if fmt is ModelFormat.GGUF:
        return _validate_gguf(root, paths)
    if fmt is ModelFormat.ADAPTER:
        return _validate_adapter(root, paths)
    return _validate_full(root, paths, fmt)


#: transformers' lazy module breaks when two threads import from it at once: one import at a time.
_IMPORT_LOCK = threading.Lock()


def _import_transformers() -> tuple[Any, Any, Any, Any]:
    with _IMPORT_LOCK:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    return torch, AutoConfig, AutoModel, AutoModelForCausalLM


def warm_up() -> None:
    """Import torch and transformers now (about ten seconds), not on the first registration."""
    _import_transformers()


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file, checked against the file's size."""
    name = path.name
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise InvalidArgument(f"{name} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise InvalidArgument(f"{name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidArgument(f"{name} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{name} is not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for key, info in header.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"{name}: tensor {key!r} has a malformed header entry") from None
        tensor = TensorInfo(dtype, shape)
        width = DTYPE_BYTES.get(dtype)
        if begin < 0 or end < begin or end > data_len:
            raise InvalidArgument(f"{name}: tensor {key!r} lies outside the file (truncated?)")
        if width is not None and end - begin != tensor.numel * width:
            raise InvalidArgument(f"{name}: tensor {key!r} has {end - begin} bytes for shape {list(shape)}")
        tensors[key] = tensor
        end_max = max(end_max, end)
    if end_max != data_len:
        raise InvalidArgument(
            f"{name}: {data_len - end_max} bytes past the last tensor (not a safetensors file)"
        )
    return tensors


def _read_json(root: Path, path: str) -> dict[str, Any]:
    try:
        data = json.loads(local_path(root, path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path} must hold a JSON object")
    return data


def _load_tensors(root: Path, files: Sequence[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for key, info in read_safetensors_header(local_path(root, path)).items():
            if key in tensors:
                raise InvalidArgument(f"tensor {key!r} appears in more than one safetensors file")
            tensors[key] = info
    return tensors


def _weight_files(root: Path, paths: Sequence[str]) -> list[str]:
    present = set(paths)
    top_level = [p for p in paths if p.endswith(".safetensors") and "/" not in p]
    if "model.safetensors.index.json" in present:
        index = _read_json(root, "model.safetensors.index.json")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidArgument("model.safetensors.index.json has no weight_map")
        shards = sorted({str(v) for v in weight_map.values()})
        missing = [s for s in shards if s not in present]
        if missing:
            raise InvalidArgument(f"shards named in model.safetensors.index.json are missing: {missing[:5]}")
        return shards
    if not top_level:
        raise InvalidArgument("no safetensors weights at the top level of the artifact")
    return top_level


def _validate_full(root: Path, paths: Sequence[str], fmt: ModelFormat) -> ArtifactReport:
    present = set(paths)
    if "config.json" not in present:
        raise InvalidArgument("config.json is missing: not a Hugging Face model directory")
    config = _read_json(root, "config.json")
    if not any(name in present for name in TOKENIZER_FILES):
        raise InvalidArgument(f"no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}")
    tensors = _load_tensors(root, _weight_files(root, paths))
    if fmt in (ModelFormat.INT8, ModelFormat.INT4):
        if not isinstance(config.get("quantization_config"), dict):
            raise InvalidArgument(f"format {fmt.value} needs a quantization_config in config.json")
        return ArtifactReport(parameter_count=0)
    expected = _expected_parameters(root)
    _compare_shapes(tensors, expected)
    want = FORMAT_DTYPE[fmt]
    floating = {k: t for k, t in tensors.items() if t.dtype in ("F32", "F16", "BF16", "F64")}
    by_dtype: dict[str, int] = {}
    for info in floating.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.numel
    dominant = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else want
    if dominant != want:
        raise InvalidArgument(f"format {fmt.value} declared but the weights are mostly {dominant}")
    counted = {k for group in expected.values() for k in group.names if k in tensors}
    return ArtifactReport(parameter_count=sum(tensors[k].numel for k in counted))


@dataclass(frozen=True)
class _Param:
    """One parameter of the model, under every name it has (tied weights share one)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]


def _expected_parameters(root: Path) -> dict[str, _Param]:
    """Parameters of the model ``config.json`` describes, built on the meta device."""
    torch, AutoConfig, AutoModel, AutoModelForCausalLM = _import_transformers()
    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise InvalidArgument(f"config.json is not a configuration transformers can load: {exc}") from None
    try:
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    except Exception as exc:  # a config transformers accepts but cannot build a model from
        raise InvalidArgument(f"cannot build a model from config.json: {exc}") from None
    groups: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        shapes[id(param)] = tuple(param.shape)
    params = {names[0]: _Param(tuple(names), shapes[key]) for key, names in groups.items()}
    prefix = getattr(model, "base_model_prefix", "")
    return _with_prefix_alias(params, prefix) if prefix else params


def _with_prefix_alias(params: dict[str, _Param], prefix: str) -> dict[str, _Param]:
    # A checkpoint saved from the bare base model names tensors without "<prefix>.": accept both.
    out: dict[str, _Param] = {}
    for key, param in params.items():
        names = list(param.names)
        names += [n[len(prefix) + 1 :] for n in param.names if n.startswith(prefix + ".")]
        out[key] = _Param(tuple(names), param.shape)
    return out


def _compare_shapes(tensors: dict[str, TensorInfo], expected: dict[str, _Param]) -> None:
    claimed: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []
    for key, param in expected.items():
        found = [n for n in param.names if n in tensors]
        if not found:
            missing.append(key)
            continue
        for name in found:
            claimed.add(name)
            if tensors[name].shape != param.shape:
                wrong.append(f"{name} is {list(tensors[name].shape)}, config says {list(param.shape)}")
    unexpected = sorted(set(tensors) - claimed)
    if wrong:
        raise InvalidArgument(f"weights do not match config.json: {'; '.join(wrong[:3])}")
    if missing:
        raise InvalidArgument(f"weights missing for config.json's model: {', '.join(sorted(missing)[:5])}")
    if unexpected:
        raise InvalidArgument(f"weights not in config.json's model: {', '.join(unexpected[:5])}")


def _validate_adapter(root: Path, paths: Sequence[str]) -> ArtifactReport:
    present = set(paths)
    if "adapter_config.json" not in present:
        raise InvalidArgument("adapter_config.json is missing: not a PEFT adapter directory")
    config = _read_json(root, "adapter_config.json")
    if "peft_type" not in config:
        raise InvalidArgument("adapter_config.json has no peft_type")
    if "adapter_model.safetensors" not in present:
        raise InvalidArgument("adapter_model.safetensors is missing")
    tensors = read_safetensors_header(local_path(root, "adapter_model.safetensors"))
    if not tensors:
        raise InvalidArgument("adapter_model.safetensors holds no tensors")
    rank = config.get("r")
    if (
        str(config["peft_type"]).upper() == "LORA"
        and isinstance(rank, int)
        and not config.get("rank_pattern")
    ):
        for key, info in tensors.items():
            if "lora_A" in key and info.shape and info.shape[0] != rank:
                raise InvalidArgument(f"{key} has rank {info.shape[0]}, adapter_config.json says r={rank}")
            if "lora_B" in key and len(info.shape) == 2 and info.shape[1] != rank:
                raise InvalidArgument(f"{key} has rank {info.shape[1]}, adapter_config.json says r={rank}")
    return ArtifactReport(parameter_count=sum(t.numel for t in tensors.values()))


def _validate_gguf(root: Path, paths: Sequence[str]) -> ArtifactReport:
    ggufs = [p for p in paths if p.lower().endswith(".gguf")]
    if len(ggufs) != 1:
        raise InvalidArgument(f"a GGUF version holds exactly one .gguf file, found {len(ggufs)}")
    with local_path(root, ggufs[0]).open("rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise InvalidArgument(f"{ggufs[0]} does not start with the GGUF magic")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in GGUF_VERSIONS:
        raise InvalidArgument(f"{ggufs[0]} has unknown GGUF version {version}")
    return ArtifactReport(parameter_count=0)
