"""A dataset is checked row by row before any compute is spent, and read only from where it may be.

Invariants: the format is inferred from the first record's fields (text, prompt/completion, chat,
preference); the FIRST malformed line is reported by its number in the file (blank lines are
skipped but counted; undecodable bytes are located too); an empty dataset and data the method cannot
train on are refused. ``DataRepository.read`` reads only paths inside the repository (or a plain
``file://`` URI), reports a missing file as NOT_FOUND, bounds the size, and records the Git commit a
revision was read at.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llmops.common.datasets import DataRepository
from llmops.common.errors import InvalidArgument, NotFound
from llmops.training.data import check_format, read_rows, validate_rows
from llmops.training.domain import DatasetRef

PC = {"prompt": "def f(x):\n", "completion": "    return x\n"}
CHAT = {
    "messages": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Add 1 to x."},
        {"role": "assistant", "content": "return x + 1"},
    ]
}
PREF = {"prompt": "def f(x):\n", "chosen": "    return x\n", "rejected": "    pass\n"}


def _jsonl(*rows: Any) -> bytes:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows).encode()


@pytest.mark.parametrize(
    ("row", "method", "expected"),
    [
        ({"text": "import os\n"}, "sft", "text"),
        (PC, "lora", "prompt_completion"),
        (CHAT, "sft", "chat"),
        (PREF, "dpo", "preference"),
    ],
)
def test_format_is_inferred_from_the_first_record(row: dict[str, Any], method: Any, expected: str) -> None:
    assert validate_rows(_jsonl(row, row, row), None, method) == (expected, 3)


def test_a_given_format_is_kept_and_rows_are_checked_against_it() -> None:
    assert validate_rows(_jsonl(PREF), "preference", "dpo") == ("preference", 1)
    # prompt/completion rows declared as chat fail on their missing messages
    with pytest.raises(InvalidArgument, match="line 1: 'messages'"):
        validate_rows(_jsonl(PC), "chat", "sft")


def _first_problem(content: bytes, method: Any = "sft") -> str:
    with pytest.raises(InvalidArgument) as caught:
        validate_rows(content, None, method)
    assert caught.value.field == "spec.dataset"
    return caught.value.message


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        ({"prompt": "def f(x):\n"}, "'completion' must be a string"),
        ({"prompt": "def f(x):\n", "completion": 3}, "'completion' must be a string"),
        ({"prompt": None, "completion": "x"}, "'prompt' must be a string"),
        ({"prompt": "def f(x):\n", "completion": "  \n"}, "'completion' is empty"),
    ],
)
def test_the_first_bad_prompt_completion_line_is_named(bad_line: Any, message: str) -> None:
    # two bad lines: only the first (line 3) is reported
    content = _jsonl(PC, PC, bad_line, PC, "{also bad")
    problem = _first_problem(content)
    assert problem.startswith("spec.dataset: line 3: ") and message in problem


def test_an_empty_prompt_is_allowed_but_not_an_empty_completion() -> None:
    assert validate_rows(_jsonl({"prompt": "", "completion": "x = 1\n"}), None, "sft") == (
        "prompt_completion",
        1,
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "'messages' must be a non-empty list"),
        ("hello", "'messages' must be a non-empty list"),
        (["hello"], "messages[0] must be an object"),
        ([{"role": "robot", "content": "beep"}], "messages[0].role must be one of assistant, system, user"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "messages[1].content must be a string"),
        ([{"role": "user", "content": "hi"}], "no assistant message to learn from"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
            "no assistant message to learn from",
        ),
    ],
)
def test_the_first_bad_chat_line_is_named(messages: Any, message: str) -> None:
    problem = _first_problem(_jsonl(CHAT, {"messages": messages}, CHAT))
    assert problem == f"spec.dataset: line 2: {message}"


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "'chosen' is empty"),
        ({"prompt": "p", "chosen": "c", "rejected": 1}, "'rejected' must be a string"),
    ],
)
def test_the_first_bad_preference_line_is_named(bad_row: Any, message: str) -> None:
    assert _first_problem(_jsonl(PREF, bad_row), "dpo") == f"spec.dataset: line 2: {message}"


def test_blank_lines_are_skipped_but_counted() -> None:
    content = b"\n" + _jsonl(PC) + b"   \n\n" + _jsonl(PC) + b"\n"
    assert validate_rows(content, None, "sft") == ("prompt_completion", 2)
    assert "line 5: not JSON" in _first_problem(b"\n" + _jsonl(PC) + b"  \n\n{oops\n")


def test_crlf_line_endings_are_accepted() -> None:
    content = _jsonl(PC, PC).replace(b"\n", b"\r\n")
    assert validate_rows(content, None, "sft") == ("prompt_completion", 2)


def test_unicode_line_separators_inside_strings_do_not_split_a_row(tmp_path: Path) -> None:
    """U+2028 / U+0085 are legal inside JSON strings (``ensure_ascii=False`` writes them raw)."""
    row = {"prompt": "a\u2028b", "completion": "c\x85d"}
    content = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    assert validate_rows(content, None, "sft") == ("prompt_completion", 1)
    snapshot = tmp_path / "dataset.jsonl"
    snapshot.write_bytes(content)
    assert read_rows(snapshot) == [row]
    # and the line numbers of later rows are still those of the file
    assert "line 2: not JSON" in _first_problem(content + b"{oops\n")


def test_non_utf8_bytes_are_located_by_line() -> None:
    content = _jsonl(PC, PC) + b'{"prompt": "caf\xe9", "completion": "x"}\n' + _jsonl(PC)
    assert _first_problem(content) == "spec.dataset: line 3: not UTF-8"


def test_an_unknown_first_record_is_located_by_line() -> None:
    problem = _first_problem(b"\n\n" + _jsonl({"question": "q", "answer": "a"}))
    assert problem.startswith("spec.dataset: line 3: cannot tell the format")


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_an_empty_dataset_is_refused(content: bytes) -> None:
    assert "no rows" in _first_problem(content)


@pytest.mark.parametrize(
    ("rows", "method", "message"),
    [
        (_jsonl(PC), "dpo", "dpo trains on preference data; the rows are prompt_completion"),
        (_jsonl(PREF), "lora", "the rows are preference"),
        (_jsonl({"text": "x"}), "dpo", "the rows are text"),
    ],
)
def test_data_the_method_cannot_train_on_is_refused(rows: bytes, method: Any, message: str) -> None:
    assert message in _first_problem(rows, method)


def test_a_declared_format_the_method_cannot_train_on_is_refused() -> None:
    check_format(None, "dpo")
    check_format("chat", "qlora")
    with pytest.raises(InvalidArgument) as caught:
        check_format("preference", "sft")
    assert caught.value.field == "spec.dataset.format"
    with pytest.raises(InvalidArgument):
        check_format("text", "dpo")


# reading ------------------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> DataRepository:
    root = tmp_path / "datarepo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "sft.jsonl").write_bytes(_jsonl(PC, PC))
    return DataRepository(root, max_bytes=1000)


def test_a_relative_path_is_read_from_the_folder_without_a_commit(repo: DataRepository) -> None:
    assert repo.read(DatasetRef("data/sft.jsonl")) == (_jsonl(PC, PC), "")


@pytest.mark.parametrize("path", ["", "../outside.jsonl", "data/../../outside.jsonl", "/etc/passwd"])
def test_paths_outside_the_repository_are_refused(repo: DataRepository, path: str) -> None:
    (repo.root.parent / "outside.jsonl").write_bytes(_jsonl(PC))
    with pytest.raises(InvalidArgument) as caught:
        repo.read(DatasetRef(path))
    assert caught.value.field == "spec.dataset.ref.path"


@pytest.mark.parametrize("path", ["data/missing.jsonl", "data"])
def test_a_missing_file_is_not_found(repo: DataRepository, path: str) -> None:
    with pytest.raises(NotFound, match=path):
        repo.read(DatasetRef(path))


def test_a_file_uri_is_read_without_a_commit(repo: DataRepository, tmp_path: Path) -> None:
    elsewhere = tmp_path / "some where" / "rows.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(_jsonl(PREF))
    assert repo.read(DatasetRef(elsewhere.as_uri())) == (_jsonl(PREF), "")
    with pytest.raises(NotFound):
        repo.read(DatasetRef((tmp_path / "nothing.jsonl").as_uri()))


def test_a_file_uri_with_a_revision_is_refused(repo: DataRepository, tmp_path: Path) -> None:
    uri = (repo.root / "data" / "sft.jsonl").as_uri()
    with pytest.raises(InvalidArgument) as caught:
        repo.read(DatasetRef(uri, revision="main"))
    assert caught.value.field == "spec.dataset.ref.revision"


def test_other_uri_schemes_are_refused(repo: DataRepository) -> None:
    with pytest.raises(InvalidArgument, match="s3:// datasets are not supported") as caught:
        repo.read(DatasetRef("s3://bucket/data.jsonl"))
    assert caught.value.field == "spec.dataset.ref.path"


def test_the_size_limit_is_enforced(repo: DataRepository, tmp_path: Path) -> None:
    big = _jsonl(*[PC] * 40)
    assert len(big) > 1000
    (repo.root / "data" / "big.jsonl").write_bytes(big)
    (tmp_path / "big.jsonl").write_bytes(big)
    for ref in (DatasetRef("data/big.jsonl"), DatasetRef((tmp_path / "big.jsonl").as_uri())):
        with pytest.raises(InvalidArgument, match="at most 1000") as caught:
            repo.read(ref)
        assert caught.value.field == "spec.dataset"


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_revision_of_a_git_repository_is_read_at_its_commit(tmp_path: Path) -> None:
    pytest.importorskip("dvc.api")
    root = tmp_path / "gitrepo"
    (root / "data").mkdir(parents=True)
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "tests@llmops.invalid")
    _git(root, "config", "user.name", "llmops tests")
    (root / "data" / "sft.jsonl").write_bytes(_jsonl(PC))
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "v1")
    first = _git(root, "rev-parse", "HEAD")
    (root / "data" / "sft.jsonl").write_bytes(_jsonl(PC, PC))
    _git(root, "commit", "-q", "-am", "v2")
    head = _git(root, "rev-parse", "HEAD")
    repository = DataRepository(root)

    assert repository.read(DatasetRef("data/sft.jsonl", revision=first)) == (_jsonl(PC), first)
    assert repository.read(DatasetRef("data/sft.jsonl", revision="main")) == (_jsonl(PC, PC), head)
    assert repository.read(DatasetRef("data/sft.jsonl")) == (_jsonl(PC, PC), head)
    with pytest.raises(NotFound, match="revision nope"):
        repository.read(DatasetRef("data/sft.jsonl", revision="nope"))
    with pytest.raises(NotFound, match=r"data/other\.jsonl"):
        repository.read(DatasetRef("data/other.jsonl", revision=first))
    with pytest.raises(InvalidArgument) as caught:
        repository.read(DatasetRef("data/sft.jsonl", revision="--all"))
    assert caught.value.field == "spec.dataset.ref.revision"
    # Lineage never names a commit that does not hold the bytes read: an edited or untracked
    # workspace file has no commit.
    (root / "data" / "sft.jsonl").write_bytes(_jsonl(PC))
    assert repository.read(DatasetRef("data/sft.jsonl")) == (_jsonl(PC), "")
    (root / "data" / "new.jsonl").write_bytes(_jsonl(PC))
    assert repository.read(DatasetRef("data/new.jsonl")) == (_jsonl(PC), "")
