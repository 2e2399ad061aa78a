"""The tiny-model factory builds a loadable, chat-ready, somewhat-trained Llama once per spec.

Invariant: ``build_tiny_model`` yields a 10-20M-parameter model folder in Hugging Face layout that
``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(dir)`` load; its tokenizer round-trips
text and renders chat turns; greedy decoding is deterministic; training lowered the loss; and the
folder is a content-addressed cache: the same spec returns it untouched, another spec goes elsewhere.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmops.common.tiny_model import (
    DEFAULT_SPEC,
    MARKER_FILE,
    TinyModel,
    TinyModelSpec,
    build_tiny_model,
    tiny_model_path,
)

HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    MARKER_FILE,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-model-cache")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> TinyModel:
    return build_tiny_model(cache_dir=cache_dir)


def test_parameter_count_is_between_10_and_20_million(tiny: TinyModel) -> None:
    assert 10_000_000 <= tiny.parameter_count <= 20_000_000
    assert tiny.spec == DEFAULT_SPEC


def test_folder_has_hugging_face_layout(tiny: TinyModel) -> None:
    missing = [name for name in HF_FILES if not (tiny.path / name).is_file()]
    assert missing == []


def test_tokenizer_round_trips_text_and_knows_special_tokens(tiny: TinyModel) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.path)
    text = "def add(a, b):\n    return a + b  # naïve ✓\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # BPE merged something
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert len(tokenizer.encode("<|user|>", add_special_tokens=False)) == 1


def test_chat_template_renders_markers_and_generation_prompt(tiny: TinyModel) -> None:
    tokenizer: Any = AutoTokenizer.from_pretrained(tiny.path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n"
        "<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n"
    )
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>\n")


def test_model_loads_and_greedy_generation_is_deterministic(tiny: TinyModel) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.path)
    model: Any = AutoModelForCausalLM.from_pretrained(tiny.path)
    assert model.config.vocab_size % 64 == 0
    assert model.generation_config.eos_token_id == [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|end|>"),
    ]
    inputs = tokenizer("import os\n\ndef ", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=20, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert first.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(first, second)


def test_training_lowered_the_loss(tiny: TinyModel) -> None:
    assert tiny.final_loss < tiny.initial_loss - 1.0


def test_same_spec_returns_cached_folder_without_rebuilding(tiny: TinyModel, cache_dir: Path) -> None:
    marker_mtime = (tiny.path / MARKER_FILE).stat().st_mtime_ns
    started = time.perf_counter()
    again = build_tiny_model(dataclasses.replace(DEFAULT_SPEC), cache_dir=cache_dir)
    assert time.perf_counter() - started < 2.0
    assert again == tiny
    assert (tiny.path / MARKER_FILE).stat().st_mtime_ns == marker_mtime


def test_other_spec_gets_other_folder(tiny: TinyModel, cache_dir: Path) -> None:
    assert tiny_model_path(cache_dir=cache_dir) == tiny.path
    other = dataclasses.replace(DEFAULT_SPEC, train_steps=DEFAULT_SPEC.train_steps + 1)
    assert tiny_model_path(other, cache_dir=cache_dir) != tiny.path
    assert tiny_model_path(dataclasses.replace(DEFAULT_SPEC, dtype="bfloat16"), cache_dir) != tiny.path


def test_invalid_spec_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        TinyModelSpec(vocab_size=4000)
