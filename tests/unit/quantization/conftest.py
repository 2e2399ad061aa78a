"""Shared fixtures: the cached tiny model, its tokenizer and a small held-out window set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmops.common.tiny_model import build_tiny_model
from llmops.quantization import evaluate


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_tiny_model().path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def heldout_windows(tokenizer: Any) -> list[torch.Tensor]:
    return evaluate.token_windows(
        tokenizer, evaluate.heldout_texts(max_chars=60_000), num_samples=4, seq_len=128
    )


@pytest.fixture(scope="session")
def fp32_perplexity(tiny_model_dir: Path, heldout_windows: list[torch.Tensor]) -> float:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return evaluate.perplexity(model, heldout_windows)
