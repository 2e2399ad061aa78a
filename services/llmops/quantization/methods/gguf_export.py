"""GGUF export for llama.cpp with the ``gguf`` package (Q8_0 by default; Q4_0, F16, F32 too).

Tensor names and the Q/K row permutation follow llama.cpp's ``convert_hf_to_gguf.py`` for the Llama
architecture (the inverse of what transformers undoes when it reads a GGUF file); 1-D tensors
(norms) stay F32 as llama.cpp writes them. The byte-level BPE tokenizer goes in as ``gpt2`` with its
merges, special token ids and chat template, so the file stands alone. :meth:`GgufQuantizer.load_for_eval`
uses ``from_pretrained(dir, gguf_file=...)``, which dequantizes to fp32: perplexity measured on it is
the GGUF weights' perplexity, while its speed is transformers' fp32 speed, not llama.cpp's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmops.common.errors import InvalidArgument
from llmops.quantization.methods.base import (
    MARKER_FILE,
    ProgressFn,
    QuantizationSpec,
    QuantizedArtifact,
    Quantizer,
    prepare_out_dir,
)

SUPPORTED_TYPES = ("Q8_0", "Q4_0", "F16", "F32")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf_name: str) -> str:
    """The llama.cpp tensor name of a transformers Llama tensor name."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    match = _LAYER_RE.match(hf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"no GGUF name for tensor {hf_name}")
    return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: rotary halves interleaved per head."""
    # (n_head * head_dim, hidden) -> (n_head, 2, head_dim / 2, hidden) -> swap -> back
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


class GgufQuantizer(Quantizer):
    """Writes one ``model-<TYPE>.gguf`` (plus config and tokenizer files for transformers)."""

    name = "gguf"
    result_format = "gguf"
    supported_bits = (0,)  # bits is ignored for GGUF: the type decides

    def validate(self, spec: QuantizationSpec) -> QuantizationSpec:
        gguf_type = (spec.gguf_type or "Q8_0").upper()
        if gguf_type not in SUPPORTED_TYPES:
            raise InvalidArgument(
                f"gguf_type {spec.gguf_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}",
                field="gguf_type",
            )
        checked = super().validate(
            QuantizationSpec(method=spec.method, device=spec.device, group_size=spec.group_size)
        )
        return QuantizationSpec(method=checked.method, device=checked.device, gguf_type=gguf_type)

    def quantize(
        self,
        src_dir: Path,
        out_dir: Path,
        spec: QuantizationSpec,
        calibration: Sequence[torch.Tensor] | None = None,
        progress: ProgressFn | None = None,
    ) -> QuantizedArtifact:
        import gguf
        from safetensors.torch import load_file
        from transformers import AutoConfig

        prepare_out_dir(out_dir)
        config = AutoConfig.from_pretrained(src_dir)
        if config.model_type != "llama":
            raise InvalidArgument(f"gguf export supports the llama architecture, not {config.model_type}")
        qtype = gguf.GGMLQuantizationType[spec.gguf_type]
        path = out_dir / gguf_file_name(spec.gguf_type)
        writer = gguf.GGUFWriter(path, "llama")
        _write_metadata(writer, config, src_dir, spec.gguf_type)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(src_dir.glob("*.safetensors")):
            state.update(load_file(shard))
        if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        for index, (hf_name, tensor) in enumerate(sorted(state.items())):
            data = tensor.to(torch.float32).numpy()
            if hf_name.endswith("q_proj.weight"):
                data = _permute(data, config.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                data = _permute(data, config.num_key_value_heads)
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(gguf_name(hf_name), data)
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(gguf_name(hf_name), data.astype(np.float16))
            else:
                writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            if progress:
                progress(0.9 * (index + 1) / len(state))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        config.save_pretrained(out_dir)  # lets tools find the architecture without parsing the file
        if progress:
            progress(1.0)
        return self._finish(src_dir, out_dir, spec, gguf_file=path.name)

    def load_for_eval(self, out_dir: Path) -> Any:
        from transformers import AutoModelForCausalLM

        settings = json.loads((out_dir / MARKER_FILE).read_text())
        model: Any = AutoModelForCausalLM.from_pretrained(
            out_dir, gguf_file=settings["gguf_file"], dtype=torch.float32
        )
        return model.eval()


def _write_metadata(writer: Any, config: Any, src_dir: Path, gguf_type: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(src_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope_theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0
    )
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(
        {
            "F32": gguf.LlamaFileType.ALL_F32,
            "F16": gguf.LlamaFileType.MOSTLY_F16,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[gguf_type]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, config, src_dir)


def _write_tokenizer(writer: Any, config: Any, src_dir: Path) -> None:
    import gguf

    tokenizer_json = json.loads((src_dir / "tokenizer.json").read_text())
    if tokenizer_json["model"]["type"] != "BPE":
        raise InvalidArgument("gguf export supports byte-level BPE tokenizers only")
    by_id = {token_id: token for token, token_id in tokenizer_json["model"]["vocab"].items()}
    special = {item["id"]: item["content"] for item in tokenizer_json.get("added_tokens", [])}
    by_id.update(special)
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(config.vocab_size):
        if token_id in special:
            tokens.append(special[token_id])
            types.append(gguf.TokenType.CONTROL)
        elif token_id in by_id:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
        else:  # padding rows of the embedding beyond the tokenizer's vocabulary
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(src_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)
