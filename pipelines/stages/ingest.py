"""Ingest: instruction and preference records from local text, deterministic given the seed.

Sources, merged in this order:

1. the hand-written seed files ``data/seed/*.jsonl`` (``prompt``/``completion`` lines);
2. functions and methods with a docstring in this interpreter's standard library source, found with
   :mod:`ast`: the prompt asks for the function by signature and docstring summary, the completion
   is its source. Each one also gives a preference pair: ``chosen`` is the real function,
   ``rejected`` a corrupted copy (body replaced by ``pass`` or ``raise NotImplementedError``, or its
   statements truncated or shuffled).

Which functions are taken (``ingest.max_functions`` of them) and how each is corrupted are drawn
from ``seed``, so the same seed and the same Python version give the same bytes.

    python -m stages.ingest [--params params.yaml] [--seed-dir data/seed] [--out-dir data/raw]
                            [--report reports/ingest.json] [--source-root DIR]

writes ``<out-dir>/instructions.jsonl`` (``id``, ``prompt``, ``completion``) and
``<out-dir>/preferences.jsonl`` (``id``, ``prompt``, ``chosen``, ``rejected``, ``corruption``),
and the counts to the report.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import random
import sys
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .common import Record, load_params, parser, pipeline_path, read_jsonl, write_json, write_jsonl

#: Folders of the standard library that hold tests, third-party packages or build files.
SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "turtledemo"}
)
#: How a rejected answer is made from the real function.
CORRUPTIONS: tuple[str, ...] = ("pass", "not_implemented", "truncated", "shuffled")
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclasses.dataclass(frozen=True)
class Function:
    """A documented function (or method) of a source file, split into what the corruptions need."""

    id: str  # "<path relative to the root>:<qualified name>:<line>"
    module: str
    qualname: str
    signature: str
    is_async: bool
    is_method: bool
    summary: str
    #: The function's lines (decorators included), dedented by its column.
    header: tuple[str, ...]  # decorators and ``def`` line(s) through the docstring
    chunks: tuple[tuple[str, ...], ...]  # one per body statement after the docstring
    indent: str  # the body's indentation
    ends_in_exit: bool = False  # the last statement is a ``return`` or ``raise``

    @property
    def source(self) -> str:
        return join_lines(self.header, *self.chunks)


def join_lines(*groups: Sequence[str]) -> str:
    return "\n".join(line for group in groups for line in group) + "\n"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_source_files(root: Path) -> Iterator[Path]:
    """``.py`` files under ``root`` in sorted walk order, skipping :data:`SKIPPED_DIRS`."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            yield Path(folder) / name


def module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or relative.stem


def summary_of(docstring: str) -> str:
    """The docstring's first sentence (of its first paragraph, lines joined)."""
    paragraph = docstring.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.split("\n") if line.strip())
    for index, char in enumerate(text):
        if char in ".!?" and (index + 1 == len(text) or text[index + 1] == " "):
            return text[: index + 1]
    return text


def _dedent(line: str, column: int) -> str:
    """``line`` without the function's indentation (a line indented less is kept as it is)."""
    prefix = line[:column]
    return line[column:] if not prefix.strip() else line


def parse_function(
    node: ast.FunctionDef | ast.AsyncFunctionDef,
    lines: Sequence[str],
    relative: Path,
    owner: str | None,
) -> Function | None:
    """The :class:`Function` for ``node``, or ``None`` when it has no docstring or no body after it,
    or its statements share lines (``a; b``) so they cannot be cut apart."""
    docstring = ast.get_docstring(node)
    if not docstring or len(node.body) < 2 or node.end_lineno is None:
        return None
    summary = summary_of(docstring)
    doc, rest = node.body[0], node.body[1:]
    previous_end = doc.end_lineno or doc.lineno
    if doc.lineno <= node.lineno:  # def f(): "doc" on one line
        return None
    column = node.col_offset

    def span(first: int, last: int) -> tuple[str, ...]:  # 1-based, inclusive
        return tuple(_dedent(line, column).rstrip() for line in lines[first - 1 : last])

    start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
    header = span(start, previous_end)
    chunks: list[tuple[str, ...]] = []
    for statement in rest:
        end = statement.end_lineno or statement.lineno
        if statement.lineno <= previous_end:
            return None
        chunks.append(span(previous_end + 1, end))
        previous_end = end
    first = _dedent(lines[rest[0].lineno - 1], column)
    indent = first[: len(first) - len(first.lstrip())]
    signature = f"{node.name}({ast.unparse(node.args)})"
    if node.returns is not None:
        signature += f" -> {ast.unparse(node.returns)}"
    qualname = f"{owner}.{node.name}" if owner else node.name
    return Function(
        id=f"{relative.as_posix()}:{qualname}:{node.lineno}",
        module=module_name(relative),
        qualname=qualname,
        signature=signature,
        is_async=isinstance(node, ast.AsyncFunctionDef),
        is_method=owner is not None,
        summary=summary,
        header=header,
        chunks=tuple(chunks),
        indent=indent,
        ends_in_exit=isinstance(rest[-1], ast.Return | ast.Raise),
    )


def functions_in(path: Path, root: Path, include_methods: bool = True) -> list[Function]:
    """The documented module-level functions of ``path`` (and methods of its module-level classes)."""
    try:
        with tokenize.open(path) as handle:  # honours a coding cookie
            source = handle.read()
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    # ast numbers lines at "\n" only; str.splitlines() would also split at \x0c, \x1c, U+2028...
    lines = source.split("\n")
    relative = path.relative_to(root)
    found: list[Function | None] = []
    for node in tree.body:
        if isinstance(node, _FUNCTIONS):
            found.append(parse_function(node, lines, relative, None))
        elif isinstance(node, ast.ClassDef) and include_methods:
            found.extend(
                parse_function(member, lines, relative, node.name)
                for member in node.body
                if isinstance(member, _FUNCTIONS)
            )
    return [function for function in found if function is not None]


def collect_functions(root: Path, include_methods: bool = True) -> list[Function]:
    return [f for path in iter_source_files(root) for f in functions_in(path, root, include_methods)]


def instruction_prompt(function: Function) -> str:
    kind = "async " if function.is_async else ""
    if function.is_method:
        owner = function.qualname.rsplit(".", 1)[0]
        what = f"the Python {kind}method `{owner}.{function.signature}`"
    else:
        what = f"a Python {kind}function `{function.signature}`"
    return f"Write {what} for the `{function.module}` module that does the following: {function.summary}"


def corrupt(function: Function, kind: str) -> str:
    """The function's source, corrupted as ``kind`` says (see :data:`CORRUPTIONS`)."""
    if kind == "pass":
        return join_lines(function.header, [f"{function.indent}pass"])
    if kind == "not_implemented":
        return join_lines(function.header, [f"{function.indent}raise NotImplementedError"])
    if kind == "truncated":
        return join_lines(function.header, *function.chunks[: max(1, len(function.chunks) // 2)])
    if kind == "shuffled":
        # The last statement (a return or raise, see applicable_corruptions) moves up, so what
        # follows it is unreachable: a shuffle of independent statements could mean the same.
        chunks = list(function.chunks)
        rng = random.Random(f"shuffle:{function.id}")
        for _ in range(8):
            rng.shuffle(chunks)
            if chunks[-1] != function.chunks[-1]:
                break
        else:
            chunks = [function.chunks[-1], *function.chunks[:-1]]
        return join_lines(function.header, *chunks)
    raise ValueError(f"unknown corruption {kind!r}; expected one of {', '.join(CORRUPTIONS)}")


def applicable_corruptions(function: Function) -> list[str]:
    kinds = ["pass", "not_implemented"]
    if len(function.chunks) >= 2:
        kinds.append("truncated")
        if function.ends_in_exit and len(set(function.chunks)) >= 2:
            kinds.append("shuffled")
    return kinds


def preference_for(function: Function, seed: int) -> Record | None:
    """A preference pair for ``function`` (the corruption drawn from ``seed`` and its id), or
    ``None`` when every corruption gives the function back unchanged."""
    chosen = function.source
    kinds = applicable_corruptions(function)
    random.Random(f"{seed}:corruption:{function.id}").shuffle(kinds)
    for kind in kinds:
        rejected = corrupt(function, kind)
        if rejected.strip() != chosen.strip():
            return {
                "id": f"stdlib:{function.id}",
                "prompt": instruction_prompt(function),
                "chosen": chosen,
                "rejected": rejected,
                "corruption": kind,
            }
    return None


def read_seed(seed_dir: Path) -> list[Record]:
    """The hand-written instruction pairs of ``seed_dir/*.jsonl`` (sorted by file name), with ids."""
    records: list[Record] = []
    for path in sorted(seed_dir.glob("*.jsonl")):
        for number, row in enumerate(read_jsonl(path), start=1):
            records.append(
                {"id": f"seed:{path.stem}:{number}", "prompt": row["prompt"], "completion": row["completion"]}
            )
    return records


def ingest(
    seed: int,
    max_functions: int,
    seed_dir: Path | None,
    root: Path | None = None,
    include_methods: bool = True,
) -> tuple[list[Record], list[Record], dict[str, Any]]:
    """Instruction records, preference records and counts.

    ``max_functions`` functions (0: all) are drawn with ``seed`` from those under ``root`` (default:
    the standard library); the seed files come first, then the functions in the drawn order.
    """
    functions = sorted(collect_functions(root or stdlib_root(), include_methods), key=lambda f: f.id)
    random.Random(seed).shuffle(functions)
    if max_functions > 0:
        functions = functions[:max_functions]
    seeds = read_seed(seed_dir) if seed_dir is not None else []
    instructions = seeds + [
        {"id": f"stdlib:{f.id}", "prompt": instruction_prompt(f), "completion": f.source} for f in functions
    ]
    preferences = [pair for pair in (preference_for(f, seed) for f in functions) if pair is not None]
    counts: dict[str, Any] = {
        "seed_instructions": len(seeds),
        "stdlib_functions": len(functions),
        "instructions": len(instructions),
        "preferences": len(preferences),
        "corruptions": {k: sum(p["corruption"] == k for p in preferences) for k in CORRUPTIONS},
    }
    return instructions, preferences, counts


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser(__doc__)
    cli.add_argument("--seed-dir", type=Path, default=pipeline_path("data/seed"))
    cli.add_argument("--out-dir", type=Path, default=pipeline_path("data/raw"))
    cli.add_argument("--report", type=Path, default=pipeline_path("reports/ingest.json"))
    cli.add_argument(
        "--source-root", type=Path, default=None, help="Python source to read instead of the standard library"
    )
    args = cli.parse_args(argv)
    params = load_params(args.params)
    settings = params.get("ingest", {})
    instructions, preferences, counts = ingest(
        seed=int(params["seed"]),
        max_functions=int(settings.get("max_functions", 0)),
        seed_dir=args.seed_dir,
        root=args.source_root,
        include_methods=bool(settings.get("include_methods", True)),
    )
    write_jsonl(args.out_dir / "instructions.jsonl", instructions)
    write_jsonl(args.out_dir / "preferences.jsonl", preferences)
    write_json(args.report, counts)
    version = ".".join(map(str, sys.version_info[:3]))
    source = args.source_root or f"the Python {version} standard library"
    print(
        f"ingest from {source}: {counts['instructions']} instructions "
        f"({counts['seed_instructions']} hand-written), {counts['preferences']} preferences "
        f"({', '.join(f'{k} {v}' for k, v in counts['corruptions'].items())})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
