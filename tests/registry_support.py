"""Small model folders for the registry tests, written in milliseconds without torch.

``write_llama`` writes a Llama config, random safetensors weights with the shapes Hugging Face's
``LlamaForCausalLM`` has for that config (computed here by hand, so validation — which asks
transformers — cross-checks them), and a word-level tokenizer. ``write_adapter`` and ``write_gguf``
write a LoRA adapter and a GGUF header. ``upload_parts`` turns a folder into the parts of an upload
(optionally breaking part-way), and ``mlflow_db`` hands out migrated MLflow databases quickly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llmops.common.artifacts.manifest import local_path, scan_directory
from llmops.registry.domain import FileChunk, ManifestFile, UploadPart, UploadSummary


def llama_shapes(
    *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, tie: bool
) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[f"{p}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_llama(
    folder: Path,
    *,
    dtype: str = "float32",
    vocab: int = 128,
    hidden: int = 32,
    layers: int = 2,
    intermediate: int = 64,
    tie: bool = True,
    seed: int = 0,
    shards: int = 1,
) -> Path:
    """A loadable tiny Llama in Hugging Face layout; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    heads, kv_heads = 4, 2
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)
    shapes = llama_shapes(
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        tie=tie,
    )
    tensors = {k: rng.standard_normal(s).astype(dtype) * 0.02 for k, s in shapes.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i::shards]}
            save_file(part, str(folder / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    write_tokenizer(folder, vocab)
    return folder


def write_tokenizer(folder: Path, vocab: int = 128) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def write_adapter(folder: Path, *, rank: int = 4, hidden: int = 32, seed: int = 1) -> Path:
    """A PEFT LoRA adapter on q_proj/v_proj of the tiny Llama."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(2):
        for proj, out in (("q_proj", hidden), ("v_proj", 16)):
            base = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{base}.lora_A.weight"] = rng.standard_normal((rank, hidden)).astype("float32")
            tensors[f"{base}.lora_B.weight"] = np.zeros((out, rank), dtype="float32")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def write_gguf(folder: Path, *, magic: bytes = b"GGUF", version: int = 3) -> Path:
    """A GGUF file holding only a header (no tensors, no metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.gguf").write_bytes(magic + struct.pack("<IQQ", version, 0, 0))
    return folder


# --- uploads as the service sees them -------------------------------------------------------------


async def upload_parts(
    folder: Path, *, chunk_bytes: int = 64 * 1024, summary: bool = True, stop_after_bytes: int | None = None
) -> AsyncIterator[UploadPart]:
    """The domain upload parts of ``folder``; with ``stop_after_bytes`` the stream breaks there."""
    sent = 0
    files = []
    for path in scan_directory(folder):
        data = local_path(folder, path).read_bytes()
        files.append(ManifestFile(path, len(data), hashlib.sha256(data).hexdigest()))
        offsets = range(0, max(len(data), 1), chunk_bytes)
        for offset in offsets:
            piece = data[offset : offset + chunk_bytes]
            if stop_after_bytes is not None and sent >= stop_after_bytes:
                raise ConnectionResetError("client went away")
            sent += len(piece)
            yield FileChunk(path, offset, piece, offset + chunk_bytes >= len(data))
    if summary:
        yield UploadSummary(tuple(files))


# --- MLflow ---------------------------------------------------------------------------------------

_TEMPLATE: dict[str, Path] = {}


def mlflow_db(folder: Path, template_root: Path) -> str:
    """A fresh MLflow SQLite database in ``folder`` (a copy of one migrated once per session)."""
    if "db" not in _TEMPLATE:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        template = template_root / "mlflow-template.db"
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _TEMPLATE["db"] = template
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "mlflow.db"
    shutil.copyfile(_TEMPLATE["db"], target)
    return f"sqlite:///{target}"
