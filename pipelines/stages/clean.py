"""Clean: normalise, scrub secrets, and drop what should not be trained on.

For each dataset (instructions, preferences), record by record in input order:

1. ``malformed``: a required field missing or not a string;
2. normalise: Unicode NFC; ``\\r\\n``/``\\r`` to ``\\n``; Unicode spaces to a space, zero-width
   characters removed; trailing whitespace of each line and blank lines around the text removed,
   runs of blank lines collapsed to one. The prompt is prose: each run of spaces becomes one space.
   Responses are code, so their indentation is kept;
3. scrub e-mail addresses and key-like strings (private key blocks, AWS access key ids, ``sk-...``
   and GitHub tokens, ``password = "..."`` values, long hex and base64 strings) into placeholders;
4. ``empty``: a field left empty; ``degenerate``: a preference whose rejected answer is its chosen;
5. ``too_short`` / ``too_long``: the response (completion, or chosen) outside
   ``[clean.min_chars, clean.max_chars]`` characters;
6. ``exact_duplicate``: the SHA-256 of prompt and response (whitespace runs collapsed) seen before;
7. ``near_duplicate``: MinHash LSH over shingles of prompt and response finds a kept record whose
   estimated Jaccard similarity is at least ``clean.minhash.threshold``.

The first of duplicates is kept. Counts per reason, and the strings scrubbed from the kept records
per kind, are printed and written to ``reports/clean.json``.

    python -m stages.clean [--params params.yaml] [--in-dir data/raw] [--out-dir data/clean]
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import (
    DATASETS,
    Record,
    iter_dataset_files,
    load_params,
    parser,
    pipeline_path,
    read_jsonl,
    write_json,
    write_jsonl,
)

#: Why a record is dropped, in the order the checks run.
DROP_REASONS: tuple[str, ...] = (
    "malformed",
    "empty",
    "degenerate",
    "too_short",
    "too_long",
    "exact_duplicate",
    "near_duplicate",
)
#: The field whose length is bounded, per dataset.
RESPONSE_FIELD = {"instructions": "completion", "preferences": "chosen"}

_UNICODE_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_BLANK_RUNS = re.compile(r"\n{3,}")
_HORIZONTAL_RUNS = re.compile(r"[ \t\f\v]+")
_ANY_WHITESPACE = re.compile(r"\s+")


def normalise(text: str, prose: bool = False) -> str:
    """NFC and whitespace normalisation (see the module docstring); ``prose`` also joins spaces."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", _UNICODE_SPACES.sub(" ", text))
    lines = [line.rstrip() for line in text.split("\n")]
    if prose:
        lines = [_HORIZONTAL_RUNS.sub(" ", line).strip() for line in lines]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


# --- secrets ---------------------------------------------------------------------------------------


def _has_letters_and_digits(match: re.Match[str]) -> bool:
    token = match.group(0)
    return any(c.isdigit() for c in token) and any(c.isalpha() for c in token)


def _looks_random_base64(match: re.Match[str]) -> bool:
    """Digits, upper- and lower-case letters, and no alphabet run such as ``ABCDEF`` or ``012345``
    (the base64 alphabet itself, ``string.ascii_letters + string.digits``, is not a secret)."""
    token = match.group(0).rstrip("=")
    if not (any(c.isdigit() for c in token) and any(c.isupper() for c in token)):
        return False
    if not any(c.islower() for c in token):
        return False
    run = 1
    for previous, current in itertools.pairwise(token):
        run = run + 1 if ord(current) == ord(previous) + 1 else 1
        if run >= 5:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class SecretPattern:
    kind: str
    pattern: re.Pattern[str]
    placeholder: str
    #: Replace only the named group (keeping the rest of the match); the whole match when empty.
    group: str = ""
    accept: Callable[[re.Match[str]], bool] | None = None


#: Applied in this order: the specific shapes before the generic hex and base64 ones.
SECRET_PATTERNS: tuple[SecretPattern, ...] = (
    SecretPattern(
        "private_key",
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL),
        "<PRIVATE_KEY>",
    ),
    SecretPattern(
        "aws_access_key", re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[0-9A-Z]{16}\b"), "<AWS_ACCESS_KEY>"
    ),
    SecretPattern("api_key", re.compile(r"\bsk-(?:[A-Za-z]+-)?[A-Za-z0-9_\-]{20,}"), "<API_KEY>"),
    SecretPattern("api_key", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), "<API_KEY>"),
    SecretPattern(
        "password",
        re.compile(
            # a name ending in one of these words (db_password, OPENAI_API_KEY), then a quoted value
            r"""(?i)\b[\w.]*?(?:password|passwd|pwd|secret|secret_key|api_?key|access_token|auth_token)"""
            r"""["']?\s*[:=]\s*(?P<q>["'])(?P<value>[^"'\n]+)(?P=q)"""
        ),
        "<PASSWORD>",
        group="value",
    ),
    SecretPattern(
        "email",
        re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"),
        "<EMAIL>",
    ),
    SecretPattern(
        "hex_secret", re.compile(r"\b[0-9a-fA-F]{32,}\b"), "<HEX_SECRET>", accept=_has_letters_and_digits
    ),
    SecretPattern(
        "base64_secret",
        re.compile(r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/]{40,}={0,2}(?![A-Za-z0-9+/=_\-])"),
        "<BASE64_SECRET>",
        accept=_looks_random_base64,
    ),
)
SECRET_KINDS: tuple[str, ...] = tuple(dict.fromkeys(p.kind for p in SECRET_PATTERNS))


def scrub(text: str, counts: Counter[str] | None = None) -> str:
    """``text`` with each secret replaced by its placeholder; ``counts`` gets one per replacement."""
    for secret in SECRET_PATTERNS:

        def replace(match: re.Match[str], secret: SecretPattern = secret) -> str:
            if secret.accept is not None and not secret.accept(match):
                return match.group(0)
            if counts is not None:
                counts[secret.kind] += 1
            if not secret.group:
                return secret.placeholder
            whole, start, end = match.group(0), *match.span(secret.group)
            offset = match.start()
            return whole[: start - offset] + secret.placeholder + whole[end - offset :]

        text = secret.pattern.sub(replace, text)
    return text


# --- near duplicates -------------------------------------------------------------------------------


def shingles(text: str, size: int, unit: str = "char") -> set[bytes]:
    """Overlapping ``size``-grams of characters (``unit="char"``, of the lower-cased text with
    whitespace runs collapsed) or of word/punctuation tokens (``unit="word"``)."""
    flat = _ANY_WHITESPACE.sub(" ", text.lower()).strip()
    if unit == "char":
        pieces: Sequence[str] = flat
        joiner = ""
    elif unit == "word":
        pieces, joiner = re.findall(r"\w+|[^\w\s]", flat), " "
    else:
        raise ValueError(f"shingle unit must be 'char' or 'word', not {unit!r}")
    if len(pieces) <= size:
        return {joiner.join(pieces).encode("utf-8")} if pieces else set()
    return {joiner.join(pieces[i : i + size]).encode("utf-8") for i in range(len(pieces) - size + 1)}


class NearDuplicateIndex:
    """Kept texts in a MinHash LSH index; :meth:`add` refuses a text too similar to a kept one.

    LSH gives candidates; a candidate counts only when the MinHash estimate of its Jaccard
    similarity reaches the threshold (LSH alone also returns some pairs below it).
    """

    def __init__(
        self,
        num_perm: int = 128,
        threshold: float = 0.8,
        shingle_size: int = 5,
        unit: str = "char",
        seed: int = 1,
    ) -> None:
        from datasketch import MinHash, MinHashLSH  # type: ignore[import-untyped]

        self._minhash = MinHash
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._kept: dict[str, Any] = {}
        self.num_perm, self.threshold, self.shingle_size, self.unit, self.seed = (
            num_perm,
            threshold,
            shingle_size,
            unit,
            seed,
        )

    def signature(self, text: str) -> Any:
        minhash = self._minhash(num_perm=self.num_perm, seed=self.seed)
        minhash.update_batch(sorted(shingles(text, self.shingle_size, self.unit)))
        return minhash

    def duplicate_of(self, text: str) -> str | None:
        """The key of a kept text this one nearly duplicates, or ``None``."""
        return self._match(self.signature(text))

    def _match(self, signature: Any) -> str | None:
        for key in sorted(self._lsh.query(signature)):
            if signature.jaccard(self._kept[key]) >= self.threshold:
                return str(key)
        return None

    def add(self, key: str, text: str) -> bool:
        """Keep ``text`` under ``key`` unless it nearly duplicates a kept one; ``True`` when kept."""
        signature = self.signature(text)
        if self._match(signature) is not None:
            return False
        self._lsh.insert(key, signature)
        self._kept[key] = signature
        return True


# --- the stage ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class CleanReport:
    input: int = 0
    kept: int = 0
    dropped: Counter[str] = dataclasses.field(default_factory=Counter)
    scrubbed: Counter[str] = dataclasses.field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "kept": self.kept,
            "dropped": {reason: self.dropped[reason] for reason in DROP_REASONS},
            "scrubbed": {kind: self.scrubbed[kind] for kind in SECRET_KINDS},
        }


def _settings(params: dict[str, Any]) -> dict[str, Any]:
    """``clean`` params with their defaults."""
    clean = dict(params.get("clean", params))
    minhash = {"num_perm": 128, "threshold": 0.8, "shingle_size": 5, "shingle_unit": "char", "seed": 1}
    minhash.update(clean.get("minhash", {}))
    return {"min_chars": 1, "max_chars": 1 << 20, **clean, "minhash": minhash}


def clean_records(
    dataset: str, records: Sequence[Record], params: dict[str, Any]
) -> tuple[list[Record], CleanReport]:
    """The records of ``dataset`` that survive cleaning (normalised and scrubbed), and the report.

    ``params`` is the params file's mapping (or just its ``clean`` section).
    """
    settings = _settings(params)
    fields = DATASETS[dataset]
    response_field = RESPONSE_FIELD[dataset]
    minhash = settings["minhash"]
    near = NearDuplicateIndex(
        num_perm=int(minhash["num_perm"]),
        threshold=float(minhash["threshold"]),
        shingle_size=int(minhash["shingle_size"]),
        unit=str(minhash["shingle_unit"]),
        seed=int(minhash["seed"]),
    )
    report = CleanReport(input=len(records))
    seen: set[str] = set()
    kept: list[Record] = []
    for index, record in enumerate(records):
        reason, cleaned, found = _clean_one(record, fields, response_field, settings)
        if not reason:
            text = f"{cleaned['prompt']}\n{cleaned[response_field]}"
            digest = hashlib.sha256(_ANY_WHITESPACE.sub(" ", text).strip().encode("utf-8")).hexdigest()
            if digest in seen:
                reason = "exact_duplicate"
            else:
                seen.add(digest)
                if not near.add(str(cleaned.get("id", index)), text):
                    reason = "near_duplicate"
        if reason:
            report.dropped[reason] += 1
        else:
            kept.append(cleaned)
            report.scrubbed.update(found)
    report.kept = len(kept)
    return kept, report


def _clean_one(
    record: Record,
    fields: Sequence[str],
    response_field: str,
    settings: dict[str, Any],
) -> tuple[str, Record, Counter[str]]:
    """The drop reason ("" when kept), the normalised and scrubbed record, and what was scrubbed."""
    found: Counter[str] = Counter()
    if not all(isinstance(record.get(name), str) for name in fields):
        return "malformed", record, found
    cleaned = dict(record)
    for name in fields:
        cleaned[name] = scrub(normalise(record[name], prose=name == "prompt"), found)
    if not all(cleaned[name].strip() for name in fields):
        return "empty", cleaned, found
    if "rejected" in cleaned and cleaned["rejected"] == cleaned["chosen"]:
        return "degenerate", cleaned, found
    length = len(cleaned[response_field])
    if length < int(settings["min_chars"]):
        return "too_short", cleaned, found
    if length > int(settings["max_chars"]):
        return "too_long", cleaned, found
    return "", cleaned, found


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser(__doc__)
    cli.add_argument("--in-dir", type=Path, default=pipeline_path("data/raw"))
    cli.add_argument("--out-dir", type=Path, default=pipeline_path("data/clean"))
    cli.add_argument("--report", type=Path, default=pipeline_path("reports/clean.json"))
    args = cli.parse_args(argv)
    params = load_params(args.params)
    summary: dict[str, Any] = {}
    for dataset, path in iter_dataset_files(args.in_dir):
        kept, report = clean_records(dataset, read_jsonl(path), params)
        write_jsonl(args.out_dir / path.name, kept)
        summary[dataset] = report.as_dict()
        dropped = ", ".join(f"{reason} {count}" for reason, count in summary[dataset]["dropped"].items())
        scrubbed = ", ".join(f"{kind} {count}" for kind, count in summary[dataset]["scrubbed"].items())
        print(
            f"clean {dataset}: {report.input} in, {report.kept} kept; dropped: {dropped}; scrubbed: {scrubbed}"
        )
    write_json(args.report, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
