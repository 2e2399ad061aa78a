"""Training data: check every row of a dataset against the format the method trains on.

A job's dataset is read once, at submission, through the shared data repository
(:class:`llmops.common.datasets.DataRepository`), and validated row by row here before any compute
is spent: the first malformed line is reported by number. The bytes are then kept as the job's
snapshot, so every attempt of the job (a resume after a lost worker, a service restart) trains on
exactly what was validated, and lineage records the commit they were read at.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llmops.common.datasets import FIELD
from llmops.common.errors import InvalidArgument
from llmops.training.domain import DATA_FORMATS, DataFormat, Method

#: The fields each format needs; every one must be a non-empty string (``messages`` a list).
FORMAT_FIELDS: dict[DataFormat, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
}
METHOD_FORMATS: dict[Method, tuple[DataFormat, ...]] = {
    "sft": ("text", "prompt_completion", "chat"),
    "lora": ("text", "prompt_completion", "chat"),
    "qlora": ("text", "prompt_completion", "chat"),
    "dpo": ("preference",),
}
CHAT_ROLES = frozenset({"system", "user", "assistant"})


@dataclasses.dataclass(frozen=True)
class DatasetSnapshot:
    """A dataset as read: its bytes, the commit they came from, and what the rows are."""

    content: bytes
    commit: str
    data_format: DataFormat
    num_rows: int


def infer_format(record: dict[str, Any], line: int = 1) -> DataFormat:
    """The format whose fields the first record (on ``line``) has (preference before prompt/completion)."""
    for data_format in ("preference", "prompt_completion", "chat", "text"):
        if all(key in record for key in FORMAT_FIELDS[data_format]):  # type: ignore[index]
            return data_format  # type: ignore[return-value]
    raise InvalidArgument(
        f"line {line}: cannot tell the format from its fields; expected one of "
        + "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FORMAT_FIELDS.items()),
        field=FIELD,
    )


def validate_rows(content: bytes, data_format: DataFormat | None, method: Method) -> tuple[DataFormat, int]:
    """Check every JSON line; returns the (inferred) format and the number of rows.

    Raises:
        InvalidArgument: naming the first bad line, or a format the method cannot train on.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise InvalidArgument(f"line {line}: not UTF-8", field=FIELD) from None
    rows = 0
    # Lines end at "\n" only: str.splitlines() would also split at U+2028, U+0085..., which JSON
    # allows raw inside strings, and would number lines unlike the file.
    for number, raw_line in enumerate(text.split("\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            record = json.loads(raw_line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {number}: not JSON ({exc.msg})", field=FIELD) from None
        if not isinstance(record, dict):
            raise InvalidArgument(f"line {number}: expected a JSON object", field=FIELD)
        if data_format is None:
            data_format = infer_format(record, number)
            if data_format not in METHOD_FORMATS[method]:
                raise InvalidArgument(
                    f"{method} trains on {' or '.join(METHOD_FORMATS[method])} data; the rows are {data_format}",
                    field=FIELD,
                )
        problem = _row_problem(record, data_format)
        if problem:
            raise InvalidArgument(f"line {number}: {problem}", field=FIELD)
        rows += 1
    if rows == 0:
        raise InvalidArgument("the dataset has no rows", field=FIELD)
    assert data_format is not None
    return data_format, rows


def check_format(data_format: DataFormat | None, method: Method) -> None:
    if data_format is not None and data_format not in METHOD_FORMATS[method]:
        raise InvalidArgument(
            f"{method} trains on {' or '.join(METHOD_FORMATS[method])} data, not {data_format}",
            field=f"{FIELD}.format",
        )


def _row_problem(record: dict[str, Any], data_format: DataFormat) -> str:
    if data_format == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages[{index}] must be an object"
            if message.get("role") not in CHAT_ROLES:
                return f"messages[{index}].role must be one of {', '.join(sorted(CHAT_ROLES))}"
            if not isinstance(message.get("content"), str):
                return f"messages[{index}].content must be a string"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return "no assistant message to learn from"
        return ""
    for key in FORMAT_FIELDS[data_format]:
        value = record.get(key)
        if not isinstance(value, str):
            return f"'{key}' must be a string"
        if not value.strip() and key != "prompt":
            return f"'{key}' is empty"
    return ""


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The records of a validated snapshot."""
    text = path.read_bytes().decode("utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


__all__ = ["DATA_FORMATS", "FIELD", "DatasetSnapshot", "check_format", "read_rows", "validate_rows"]
