"""Clean normalises text, scrubs secrets and drops each kind of bad record for its reason.

Invariants: text comes out NFC with normalised whitespace, code keeping its indentation; each
secret kind is replaced by its placeholder while look-alikes that are not secrets (the base64
alphabet, short hex, decorators) stay; every dropped record is counted under exactly one reason,
and input = kept + dropped; of duplicates (exact after normalisation, or near by MinHash) the first
is kept; the report file holds the counts.
"""

from __future__ import annotations

import json
import string
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipelines.stages import clean
from pipelines.stages.common import read_jsonl, write_jsonl

PARAMS: dict[str, Any] = {"clean": {"min_chars": 10, "max_chars": 200}}
CODE = "def add(a, b):\n    return a + b\n"


def _instruction(prompt: str = "Add two numbers.", completion: str = CODE, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "completion": completion, **extra}


def _clean(records: list[dict[str, Any]], dataset: str = "instructions", params: Any = None) -> Any:
    return clean.clean_records(dataset, records, params or PARAMS)


# --- normalisation -------------------------------------------------------------------------------


def test_text_is_nfc_normalised() -> None:
    decomposed = "Cafe\u0301 nai\u0308ve"
    assert unicodedata.is_normalized("NFC", decomposed) is False
    result = clean.normalise(decomposed)
    assert result == "Café naïve" and unicodedata.is_normalized("NFC", result)


def test_whitespace_is_normalised_and_code_keeps_its_indentation() -> None:
    raw = "\n\r\ndef f(x):\u00a0\r\n    if x:\t \n        return\u200b x\n\n\n\n    return 0   \n\n"
    assert clean.normalise(raw) == "def f(x):\n    if x:\n        return x\n\n    return 0"


def test_prose_joins_runs_of_spaces() -> None:
    assert (
        clean.normalise("  Write   a\tfunction \n  that   adds. ", prose=True)
        == "Write a function\nthat adds."
    )


def test_records_are_kept_normalised() -> None:
    kept, report = _clean(
        [_instruction("  Add\u00a0two   nu\u0301mbers.  ", "def add(a, b):   \r\n    return a + b\r\n")]
    )
    assert report.kept == 1
    assert kept[0]["prompt"] == "Add two n\u00fambers."
    assert kept[0]["completion"] == "def add(a, b):\n    return a + b"


# --- drop reasons --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "record", "reason"),
    [
        ("instructions", {"prompt": "no completion"}, "malformed"),
        ("instructions", {"prompt": "x", "completion": 3}, "malformed"),
        ("instructions", _instruction(completion=" \n\u200b\t\n"), "empty"),
        ("instructions", _instruction(prompt="\u00a0 "), "empty"),
        ("preferences", {"prompt": "p", "chosen": CODE, "rejected": CODE + "  \n"}, "degenerate"),
        ("instructions", _instruction(completion="return 1"), "too_short"),
        ("instructions", _instruction(completion="x = 1\n" * 50), "too_long"),
        ("preferences", {"prompt": "p", "chosen": "pass", "rejected": "raise Error"}, "too_short"),
    ],
)
def test_each_bad_record_is_dropped_for_its_reason(dataset: str, record: dict[str, Any], reason: str) -> None:
    kept, report = _clean([record], dataset)
    assert kept == []
    assert report.dropped == Counter({reason: 1})
    assert report.as_dict()["dropped"][reason] == 1
    assert set(report.as_dict()["dropped"]) == set(clean.DROP_REASONS)


def test_length_bounds_are_inclusive_and_measured_on_the_response() -> None:
    params = {"clean": {"min_chars": 8, "max_chars": 12}}
    records = [_instruction(prompt="p" * 500, completion=c) for c in ("x" * 7, "y" * 8, "z" * 12, "w" * 13)]
    kept, report = _clean(records, params=params)
    assert [r["completion"] for r in kept] == ["y" * 8, "z" * 12]
    assert report.dropped == Counter({"too_short": 1, "too_long": 1})


def test_exact_duplicates_after_normalisation_keep_the_first() -> None:
    first = _instruction(id="a")
    same = _instruction(
        prompt="Add  two numbers.", completion="def add(a, b):\r\n    return a + b   \n", id="b"
    )
    decomposed = _instruction(prompt="Cafe\u0301", id="c")
    composed = _instruction(prompt="Caf\u00e9", id="d")
    kept, report = _clean([first, same, decomposed, composed])
    assert [r["id"] for r in kept] == ["a", "c"]
    assert report.dropped == Counter({"exact_duplicate": 2})


def test_near_duplicates_keep_the_first_and_different_records_are_all_kept() -> None:
    body = "def total(values):\n    result = 0\n    for value in values:\n        result += value\n    return result\n"
    near = body.replace("result", "results", 1)  # one token changed in a long text
    other = "def shout(text):\n    return text.upper() + '!'\n"
    third = "def mean(xs):\n    if not xs:\n        raise ValueError('empty')\n    return sum(xs) / len(xs)\n"
    records = [
        _instruction("Sum the values of a list.", body, id="first"),
        _instruction("Sum the values of a list.", near, id="near"),
        _instruction("Upper-case a text and add an exclamation mark.", other, id="other"),
        _instruction("Average of a list.", third, id="third"),
    ]
    kept, report = _clean(records, params={"clean": {"min_chars": 1, "max_chars": 1000}})
    assert [r["id"] for r in kept] == ["first", "other", "third"]
    assert report.dropped == Counter({"near_duplicate": 1})
    assert report.input == report.kept + sum(report.dropped.values())


def test_the_near_duplicate_index_compares_by_estimated_jaccard() -> None:
    index = clean.NearDuplicateIndex(num_perm=128, threshold=0.8, shingle_size=5)
    text = "the quick brown fox jumps over the lazy dog near the river bank at dawn " * 3
    assert index.add("a", text)
    assert index.duplicate_of(text + " again") == "a"
    assert not index.add("b", text.replace("lazy", "lazier"))
    assert index.add("c", "an entirely different sentence about quantization of neural networks")
    assert index.duplicate_of("yet another text, about DVC pipelines and their stages") is None


def test_shingles_by_character_and_by_word() -> None:
    assert clean.shingles("ab  CD", 3) == {b"ab ", b"b c", b" cd"}
    assert clean.shingles("x = f(y)", 3, unit="word") == {b"x = f", b"= f (", b"f ( y", b"( y )"}
    assert clean.shingles("ab", 5) == {b"ab"}
    with pytest.raises(ValueError, match="shingle unit"):
        clean.shingles("ab", 5, unit="line")


# --- secrets -------------------------------------------------------------------------------------

AWS = "AKIAIOSFODNN7EXAMPLE"
OPENAI = "sk-proj-abcdefghijklmnopqrstuvwxyz123456"
GITHUB = "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dF3hJ5"
HEX = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
BASE64 = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail alice.smith+ops@example.co.uk now", "mail <EMAIL> now", "email"),
        (f"key = {AWS}", "key = <AWS_ACCESS_KEY>", "aws_access_key"),
        (f"OPENAI_API_KEY={OPENAI}", "OPENAI_API_KEY=<API_KEY>", "api_key"),
        (f"token {GITHUB} here", "token <API_KEY> here", "api_key"),
        ('password = "hunter2"', 'password = "<PASSWORD>"', "password"),
        ("db_passwd='s3cr3t!'", "db_passwd='<PASSWORD>'", "password"),
        ('{"api_key": "abc123"}', '{"api_key": "<PASSWORD>"}', "password"),
        (f"digest: {HEX}", "digest: <HEX_SECRET>", "hex_secret"),
        (f"aws_secret={BASE64}", "aws_secret=<BASE64_SECRET>", "base64_secret"),
        (f"before\n{PRIVATE_KEY}\nafter", "before\n<PRIVATE_KEY>\nafter", "private_key"),
    ],
)
def test_each_secret_kind_is_replaced_by_its_placeholder(text: str, expected: str, kind: str) -> None:
    counts: Counter[str] = Counter()
    assert clean.scrub(text, counts) == expected
    assert counts == Counter({kind: 1})


@pytest.mark.parametrize(
    "text",
    [
        string.ascii_letters + string.digits + "+/",  # the base64 alphabet
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" * 2,
        "color = 0xdeadbeef",  # short hex
        "@property\ndef name(self):\n    return self._name",  # a decorator is no e-mail address
        'password = ""',  # nothing to hide
        "password = getpass.getpass()",
        "a_very_long_identifier_name_that_goes_on_and_on_forever_and_ever",
        "sk-short",
    ],
)
def test_look_alikes_that_are_not_secrets_stay(text: str) -> None:
    counts: Counter[str] = Counter()
    assert clean.scrub(text, counts) == text
    assert not counts


def test_secrets_are_scrubbed_in_every_field_and_counted_in_the_report() -> None:
    record = {
        "prompt": "Mail bob@example.org the key.",
        "chosen": f"def key():\n    return '{AWS}'\n",
        "rejected": 'def key():\n    password = "letmein"\n',
    }
    kept, report = _clean([record], "preferences")
    assert kept == [
        {
            "prompt": "Mail <EMAIL> the key.",
            "chosen": "def key():\n    return '<AWS_ACCESS_KEY>'",
            "rejected": 'def key():\n    password = "<PASSWORD>"',
        }
    ]
    assert report.as_dict()["scrubbed"] == {kind: 0 for kind in clean.SECRET_KINDS} | {
        "email": 1,
        "aws_access_key": 1,
        "password": 1,
    }


def test_two_records_differing_only_in_a_secret_are_duplicates() -> None:
    kept, report = _clean([_instruction(f"Use key {AWS}."), _instruction("Use key AKIAZZZZZZZZZZZZZZZZ.")])
    assert len(kept) == 1 and report.dropped == Counter({"exact_duplicate": 1})


# --- the stage -----------------------------------------------------------------------------------


def test_the_stage_writes_cleaned_files_and_the_report(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_jsonl(raw / "instructions.jsonl", [_instruction(id="a"), _instruction(id="b"), {"prompt": "?"}])
    write_jsonl(
        raw / "preferences.jsonl", [{"prompt": "p", "chosen": CODE, "rejected": "def add(a, b):\n    pass\n"}]
    )
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(PARAMS))
    report = tmp_path / "reports" / "clean.json"
    argv = [
        "--params",
        str(params),
        "--in-dir",
        str(raw),
        "--out-dir",
        str(tmp_path / "clean"),
        "--report",
        str(report),
    ]
    assert clean.main(argv) == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "clean" / "instructions.jsonl")] == ["a"]
    assert len(read_jsonl(tmp_path / "clean" / "preferences.jsonl")) == 1
    summary = json.loads(report.read_text())
    assert summary["instructions"]["input"] == 3 and summary["instructions"]["kept"] == 1
    assert summary["instructions"]["dropped"]["exact_duplicate"] == 1
    assert summary["instructions"]["dropped"]["malformed"] == 1
    assert summary["preferences"]["kept"] == 1
