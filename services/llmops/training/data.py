"""Training data: read a file of the DVC data repository at a revision, and check every row.

A job's dataset is read once, at submission, and validated row by row before any compute is spent:
the first malformed line is reported by number. The bytes are then kept as the job's snapshot, so
every attempt of the job (a resume after a lost worker, a service restart) trains on exactly what
was validated, and lineage records the commit they were read at.

Files in the workspace are read directly; at a revision, ``dvc.api`` reads them (DVC-tracked files
from the DVC cache or remote, Git-tracked ones from Git).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, caller_path
from llmops.training.domain import DATA_FORMATS, DataFormat, DatasetRef, Method

FIELD = "spec.dataset"
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
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class DatasetSnapshot:
    """A dataset as read: its bytes, the commit they came from, and what the rows are."""

    content: bytes
    commit: str
    data_format: DataFormat
    num_rows: int


class DataRepository:
    """The DVC data repository at ``root`` (a Git work tree with ``.dvc/``, or a plain folder)."""

    def __init__(self, root: Path, *, max_bytes: int = 1 << 30) -> None:
        self.root = root
        self._max_bytes = max_bytes

    def read(self, ref: DatasetRef) -> tuple[bytes, str]:
        """The file's bytes and the commit they were read at (empty when not under Git).

        Raises:
            InvalidArgument: a path outside the repository, or a revision with an absolute URI.
            NotFound: no such file or revision.
        """
        if not ref.path:
            raise InvalidArgument("a path is required", field=f"{FIELD}.ref.path")
        if "://" in ref.path:
            return self._read_uri(ref), ""
        relative = Path(ref.path)
        if relative.is_absolute() or ".." in relative.parts:
            raise InvalidArgument(
                "a path relative to the data repository, without '..'", field=f"{FIELD}.ref.path"
            )
        if ref.repo or ref.revision:
            return self._read_at_revision(ref)
        path = self.root / relative
        with caller_path(ref.path, field=f"{FIELD}.ref.path"):
            if not path.is_file():
                raise NotFound(f"dataset {ref.path} does not exist in the data repository")
            content = self._checked(path.read_bytes())
        return content, self._workspace_commit(relative, content)

    def _read_uri(self, ref: DatasetRef) -> bytes:
        if ref.revision:
            raise InvalidArgument("must be empty for an absolute URI", field=f"{FIELD}.ref.revision")
        parsed = urlparse(ref.path)
        if parsed.scheme != "file":
            raise InvalidArgument(
                f"{parsed.scheme}:// datasets are not supported; use a data repository path or file://",
                field=f"{FIELD}.ref.path",
            )
        path = Path(unquote(parsed.path))
        with caller_path(ref.path, field=f"{FIELD}.ref.path"):
            if not path.is_file():
                raise NotFound(f"dataset {ref.path} does not exist")
            return self._checked(path.read_bytes())

    def _read_at_revision(self, ref: DatasetRef) -> tuple[bytes, str]:
        import dvc.api
        from dvc.exceptions import DvcException, PathMissingError

        repo = ref.repo or str(self.root)
        commit = ref.revision if _COMMIT.match(ref.revision) else ""
        if not ref.repo:
            commit = self._resolve_revision(ref.revision or "HEAD")
        with caller_path(ref.path, field=f"{FIELD}.ref.path"):  # too long, unreadable...
            try:
                data = dvc.api.read(ref.path, repo=repo, rev=commit or ref.revision or None, mode="rb")
            except (PathMissingError, FileNotFoundError):
                raise NotFound(
                    f"dataset {ref.path} does not exist at revision {ref.revision or 'HEAD'}"
                ) from None
            except DvcException as exc:
                raise FailedPrecondition(
                    f"cannot read dataset {ref.path}: {str(exc).splitlines()[0]}"
                ) from None
        return self._checked(bytes(data)), commit

    def _resolve_revision(self, revision: str) -> str:
        if revision.startswith("-"):
            raise InvalidArgument("not a revision", field=f"{FIELD}.ref.revision")
        done = self._git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
        if done is None:
            raise NotFound(f"revision {revision} does not exist in the data repository")
        return done

    def _workspace_commit(self, relative: Path, content: bytes) -> str:
        """HEAD's commit when the workspace file is what HEAD holds; empty when it is not (or unknown).

        A DVC-tracked file matches when its ``.dvc`` file is unchanged since HEAD and records the
        content's md5; a pipeline output when HEAD's ``dvc.lock`` records the content's md5; a
        Git-tracked one when ``git diff`` against HEAD is empty.
        """
        head = self._git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")
        if head is None:
            return ""
        pointer = relative.with_name(relative.name + ".dvc")
        if (self.root / pointer).is_file():
            import yaml

            try:
                outs = yaml.safe_load((self.root / pointer).read_text())["outs"]
                recorded = next(o["md5"] for o in outs if o.get("path") == relative.name)
            except (OSError, ValueError, KeyError, TypeError, StopIteration, yaml.YAMLError):
                return ""
            unchanged = self._git_ok("diff", "--quiet", "HEAD", "--", pointer.as_posix())
            return head if unchanged and recorded == hashlib.md5(content).hexdigest() else ""
        if (self.root / "dvc.lock").is_file():
            recorded_out = self._locked_md5(relative)
            if recorded_out is not None:
                return head if recorded_out == hashlib.md5(content).hexdigest() else ""
        tracked = self._git_ok("ls-files", "--error-unmatch", "--", relative.as_posix())
        clean = tracked and self._git_ok("diff", "--quiet", "HEAD", "--", relative.as_posix())
        return head if clean else ""

    def _locked_md5(self, relative: Path) -> str | None:
        """The md5 HEAD's ``dvc.lock`` records for a pipeline output at ``relative``; None if none."""
        import yaml

        text = self._git("show", "HEAD:./dvc.lock")
        if text is None:
            return None
        try:
            stages = yaml.safe_load(text).get("stages", {})
            for stage in stages.values():
                for out in stage.get("outs", []):
                    if out.get("path") == relative.as_posix():
                        return str(out.get("md5", ""))
        except (AttributeError, TypeError, yaml.YAMLError):
            return None
        return None

    def _git_ok(self, *args: str) -> bool:
        try:
            done = subprocess.run(
                ["git", "-C", str(self.root), *args], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def _git(self, *args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(self.root), *args], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None

    def _checked(self, data: bytes) -> bytes:
        if len(data) > self._max_bytes:
            raise InvalidArgument(
                f"the dataset is {len(data)} bytes; this server takes at most {self._max_bytes}", field=FIELD
            )
        return data


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


__all__ = ["DATA_FORMATS", "DataRepository", "DatasetSnapshot", "check_format", "read_rows", "validate_rows"]
