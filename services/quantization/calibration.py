"""Calibration token windows for GPTQ/AWQ from a job's ``calibration`` DatasetSample.

The text is what ``evaluate.heldout_texts`` reads (a text file, a folder of ``.py``/``.txt``/``.md``
files, or by default held-out standard-library files), or the ``text`` fields (chat ``messages``
rendered with the tokenizer's chat template) of a ``.jsonl`` file; ``evaluate.token_windows`` cuts
it into ``(1, seq_len)`` windows. When the calibration text is the job's evaluation text, the
windows start after the tokens the evaluation uses, so perplexity is never measured on the data
the weights were fitted to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from llmops.common.errors import InvalidArgument
from llmops.quantization import evaluate
from llmops.quantization.methods.base import (
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_CALIBRATION_SEQ_LEN,
    CalibrationSpec,
)

#: Characters read per wanted token: generous, so a file set is never cut short (reading is cheap).
_CHARS_PER_TOKEN = 12


def calibration_windows(
    tokenizer: Any,
    spec: CalibrationSpec,
    *,
    context_length: int | None = None,
    eval_text_path: Path | None = None,
    eval_tokens: int = 0,
) -> list[torch.Tensor]:
    """Up to ``spec.num_samples`` windows of ``spec.seq_len`` tokens (capped at ``context_length``).

    Args:
        tokenizer: The source model's tokenizer.
        spec: The validated calibration spec.
        context_length: The model's context length; windows are never longer.
        eval_text_path: The job's evaluation text (``None``: the default held-out text).
        eval_tokens: Tokens the evaluation reads from the start of that text; skipped when the
            calibration text is the same.

    Raises:
        InvalidArgument: the text is shorter than one window (after the skipped part).
    """
    num_samples = spec.num_samples or DEFAULT_CALIBRATION_SAMPLES
    seq_len = spec.seq_len or DEFAULT_CALIBRATION_SEQ_LEN
    if context_length:
        seq_len = min(seq_len, context_length)
    skip = math.ceil(eval_tokens / seq_len) if _same_text(spec.text_path, eval_text_path) else 0
    wanted = (skip + num_samples) * seq_len
    texts = _texts(tokenizer, spec.text_path, max_chars=wanted * _CHARS_PER_TOKEN)
    try:
        windows = evaluate.token_windows(tokenizer, texts, skip + num_samples, seq_len)
    except ValueError:
        windows = []
    if len(windows) <= skip:
        where = "after the evaluation's share " if skip else ""
        raise InvalidArgument(
            f"calibration text has fewer than {seq_len} tokens {where}(one window)", field="calibration"
        )
    return windows[skip:]


def _same_text(calibration: Path | None, evaluation: Path | None) -> bool:
    if calibration is None or evaluation is None:
        return calibration is evaluation
    return calibration.resolve() == evaluation.resolve()


def _texts(tokenizer: Any, path: Path | None, max_chars: int) -> list[str]:
    if path is None or not (path.is_file() and path.suffix == ".jsonl"):
        return evaluate.heldout_texts(max_chars=max_chars, path=path)
    texts: list[str] = []
    total = 0
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InvalidArgument(
                f"calibration data {path.name} line {number} is not JSON", field="calibration"
            ) from None
        text = _record_text(tokenizer, record)
        if text:
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise InvalidArgument(
            f"calibration data {path.name} has no records with text or messages", field="calibration"
        )
    return texts


def _record_text(tokenizer: Any, record: Any) -> str:
    if not isinstance(record, dict):
        return ""
    if isinstance(record.get("text"), str):
        return str(record["text"])
    if isinstance(record.get("messages"), list) and getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(record["messages"], tokenize=False))
    return ""
