"""Measure a model before and after quantization: perplexity, size and generation speed.

Held-out text defaults to standard-library ``.py`` files that come after the tiny model's training
corpus in its sorted walk, so the tiny model never saw them; a text file or folder may be given
instead. Perplexity is ``exp`` of the mean next-token negative log-likelihood over fixed-length
windows; throughput is greedy ``generate`` with a fixed number of new tokens (EOS ignored), timed
after one warm-up call.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llmops.common.tiny_model import DEFAULT_SPEC, corpus_files

DEFAULT_SEQ_LEN = 512
DEFAULT_NUM_SAMPLES = 128
DEFAULT_THROUGHPUT_TOKENS = 256
_THROUGHPUT_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one model measured; ``None`` where it was not measured."""

    perplexity: float | None = None
    tokens_per_second: float | None = None


def heldout_texts(max_chars: int = 400_000, path: Path | None = None) -> list[str]:
    """Evaluation text: ``path`` (a file, or the ``.py``/``.txt``/``.md`` files in a folder) or,
    by default, standard-library files outside the tiny model's training corpus."""
    if path is not None:
        files = (
            [path]
            if path.is_file()
            else sorted(p for p in path.rglob("*") if p.suffix in {".py", ".txt", ".md"} and p.is_file())
        )
    else:
        training = len(corpus_files(DEFAULT_SPEC.corpus_bytes))
        files = [p for p, _, _ in corpus_files(10**12)[training:]]
    texts: list[str] = []
    total = 0
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise ValueError("no held-out text found")
    return texts


def token_windows(tokenizer: Any, texts: Sequence[str], num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Cut the concatenated token stream into up to ``num_samples`` windows of shape ``(1, seq_len)``."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= num_samples * seq_len:
            break
    count = min(num_samples, len(ids) // seq_len)
    if count == 0:
        raise ValueError(f"held-out text has fewer than {seq_len} tokens")
    return [torch.tensor(ids[i * seq_len : (i + 1) * seq_len]).unsqueeze(0) for i in range(count)]


@torch.no_grad()  # not inference_mode: quanto tensors need version counters
def perplexity(model: Any, windows: Sequence[torch.Tensor]) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``windows``."""
    total_nll = 0.0
    total_tokens = 0
    for window in windows:
        logits = model(input_ids=window).logits.float()  # (1, seq, vocab)
        nll = torch.nn.functional.cross_entropy(
            logits[0, :-1], window[0, 1:], reduction="sum"
        )  # predictions for positions 1..seq-1
        total_nll += float(nll)
        total_tokens += window.shape[1] - 1
    return math.exp(total_nll / total_tokens)


@torch.no_grad()  # not inference_mode: quanto tensors need version counters
def tokens_per_second(model: Any, tokenizer: Any, new_tokens: int = DEFAULT_THROUGHPUT_TOKENS) -> float:
    """Greedy generation speed of ``new_tokens`` tokens after a short prompt (batch 1)."""
    inputs = tokenizer(_THROUGHPUT_PROMPT, return_tensors="pt")
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model.generate(**inputs, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    start = time.perf_counter()
    output = model.generate(**inputs, **kwargs)
    elapsed = time.perf_counter() - start
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    return float(generated) / elapsed


def measure(
    model: Any,
    tokenizer: Any,
    windows: Sequence[torch.Tensor] | None,
    throughput_tokens: int | None,
) -> Measurement:
    """Perplexity on ``windows`` (when given) and tokens/s (when ``throughput_tokens`` is set)."""
    return Measurement(
        perplexity=perplexity(model, windows) if windows else None,
        tokens_per_second=tokens_per_second(model, tokenizer, throughput_tokens)
        if throughput_tokens
        else None,
    )
