"""Calibration token windows for GPTQ/AWQ from a job's ``calibration`` DatasetSample.

The text is what ``evaluate.heldout_texts`` reads (a text file, a folder of ``.py``/``.txt``/``.md``
files, or by default held-out standard-library files), or the ``text`` fields (chat ``messages``
rendered with the tokenizer's chat template) of a ``.jsonl`` file; ``evaluate.token_windows`` cuts
it into ``(1, seq_len)`` windows. When the calibration text is the job's evaluation text, the
windows start after the tokens the evaluation uses, so perplexity is never measured on the data
the weights were fitted to.

Calibration data at a revision of the DVC data repository (or of another Git/DVC repo) is read by
the data repository code training uses (:class:`llmops.common.datasets.DataRepository`, through
``dvc.api``), once, when the job is submitted (:func:`snapshot_calibration`): the bytes go into a
snapshot file in the job's work folder, so the worker reads exactly what was read, and the commit is
recorded in the result's lineage.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmops.common.errors import FailedPrecondition, InvalidArgument
from llmops.quantization import evaluate
from llmops.quantization.methods.base import (
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_CALIBRATION_SEQ_LEN,
    CalibrationSpec,
)

if TYPE_CHECKING:
    from llmops.common.datasets import DataRepository

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


def snapshot_calibration(
    repository: DataRepository | None, spec: CalibrationSpec, folder: Path
) -> CalibrationSpec:
    """Read a versioned calibration reference into ``folder``; other specs come back unchanged.

    Returns:
        ``spec`` with ``text_path`` naming the snapshot (same file name, so a ``.jsonl`` stays one)
        and ``dataset_commit`` the commit it was read at (empty when the revision names no commit
        of the data repository, e.g. a branch of another repo).

    Raises:
        InvalidArgument: a bad path or revision (named as the calibration's field).
        NotFound: no such file or revision.
        FailedPrecondition: this server has no data repository, or DVC cannot read the file.
    """
    if not spec.versioned:
        return spec
    from llmops.common.datasets import DatasetRef

    assert spec.dataset is not None
    if repository is None:
        raise FailedPrecondition("this server has no data repository to read calibration data from")
    path, revision, repo = spec.dataset
    try:
        content, commit = repository.read(DatasetRef(path=path, revision=revision, repo=repo))
    except InvalidArgument as error:  # the repository names training's field; this is calibration's
        field = (error.field or "").replace("spec.dataset", "calibration", 1) or "calibration"
        raise InvalidArgument(error.message, field=field) from None
    folder.mkdir(parents=True, exist_ok=True)
    snapshot = folder / (Path(path).name or "calibration.txt")
    snapshot.write_bytes(content)
    return dataclasses.replace(spec, text_path=snapshot, dataset_commit=commit)
