"""The GGUF export is a file llama.cpp's own reader accepts: Llama tensor names, Q8_0 blocks for
matrices and F32 norms, the model's hyperparameters and its complete tokenizer; and transformers
loads it back into a model whose logits match the fp32 source's closely (a wrong Q/K permutation
or tensor mapping would not).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmops.quantization.methods import QuantizationSpec, default_quantizers, resolve
from llmops.quantization.methods.gguf_export import gguf_file_name, gguf_name


@pytest.fixture(scope="module")
def q8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    quantizer, spec = resolve(default_quantizers(), QuantizationSpec("gguf", gguf_type="q8_0"))
    out = tmp_path_factory.mktemp("gguf") / "out"
    quantizer.quantize(tiny_model_dir, out, spec)
    return out


def test_reader_sees_llama_tensors_and_metadata(q8_dir: Path, tiny_model_dir: Path) -> None:
    import gguf

    config = json.loads((tiny_model_dir / "config.json").read_text())
    reader = gguf.GGUFReader(q8_dir / gguf_file_name("Q8_0"))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * config["num_hidden_layers"]
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == config["num_hidden_layers"]
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == config["num_key_value_heads"]
    assert len(fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    assert "tokenizer.ggml.merges" in fields


@torch.no_grad()
def test_transformers_loads_it_with_logits_close_to_the_source(q8_dir: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    source: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    source.eval()
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        q8_dir, gguf_file=gguf_file_name("Q8_0"), dtype=torch.float32
    )
    ids = torch.arange(5, 69).unsqueeze(0)  # (1, 64)
    expected = source(input_ids=ids).logits
    got = loaded.eval()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=0.05 * float(expected.abs().max()))
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize(
    ("hf", "expected"),
    [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.layers.3.self_attn.k_proj.weight", "blk.3.attn_k.weight"),
        ("model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ],
)
def test_tensor_names_follow_llama_cpp(hf: str, expected: str) -> None:
    assert gguf_name(hf) == expected
