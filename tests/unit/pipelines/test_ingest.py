"""Ingest turns documented functions into instruction and preference records, deterministically.

Invariants: only functions (and methods of module-level classes) with a docstring and a body after
it are taken, from files that parse, outside test folders; the completion is the function's source
(decorators included, methods dedented); every rejected answer is valid Python, differs from the
chosen one and keeps its signature and docstring; the hand-written seed records come first; the
same seed gives the same bytes (on the real standard library too), another seed another sample.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from pipelines.stages import ingest
from pipelines.stages.common import DATASETS, read_jsonl

SEED_DIR = Path(__file__).resolve().parents[3] / "pipelines" / "data" / "seed"


def _functions(root: Path) -> dict[str, ingest.Function]:
    return {f.qualname: f for f in ingest.collect_functions(root)}


def test_documented_functions_with_a_body_are_found_and_the_rest_skipped(fake_stdlib: Path) -> None:
    found = _functions(fake_stdlib)
    assert sorted(found) == ["Box.put", "Box.stub", "add", "cached", "fetch"]
    assert all(f.id.startswith("pkg/__init__.py:") for f in found.values())  # not test/, not broken.py
    assert found["add"].module == "pkg"
    assert found["add"].summary == "Return a plus b."
    assert found["cached"].summary == "Compute x squared."
    assert found["cached"].signature == "cached(x: int) -> int"
    assert found["fetch"].is_async and not found["fetch"].is_method


def test_the_completion_is_the_functions_source(fake_stdlib: Path) -> None:
    found = _functions(fake_stdlib)
    assert found["add"].source == (
        "def add(a, b=1):\n"
        '    """Return a plus b.\n\n'
        "    More text that is not the summary.\n"
        '    """\n'
        "    # a comment that belongs to the first statement\n"
        "    total = a + b\n\n"
        "    return total\n"
    )
    assert found["cached"].source.startswith("@functools.cache\ndef cached(x: int) -> int:\n")
    method = found["Box.put"].source
    assert method.startswith("def put(self, item):\n") and "\n    return self.count\n" in method
    ast.parse(method)


def test_prompts_name_the_function_its_module_and_its_summary(fake_stdlib: Path) -> None:
    found = _functions(fake_stdlib)
    assert ingest.instruction_prompt(found["add"]) == (
        "Write a Python function `add(a, b=1)` for the `pkg` module that does the following: Return a plus b."
    )
    assert ingest.instruction_prompt(found["Box.put"]).startswith(
        "Write the Python method `Box.put(self, item)`"
    )
    assert ingest.instruction_prompt(found["fetch"]).startswith("Write a Python async function `fetch(url)`")


@pytest.mark.parametrize("kind", ingest.CORRUPTIONS)
def test_each_corruption_is_valid_python_that_differs_but_keeps_the_signature(
    fake_stdlib: Path, kind: str
) -> None:
    function = _functions(fake_stdlib)["Box.put"]
    assert kind in ingest.applicable_corruptions(function)
    rejected = ingest.corrupt(function, kind)
    ast.parse(rejected)
    assert rejected != function.source
    assert rejected.startswith('def put(self, item):\n    """Put an item in the box."""\n')
    body = rejected.split('"""Put an item in the box."""\n', 1)[1]
    expected = {
        "pass": "    pass\n",
        "not_implemented": "    raise NotImplementedError\n",
        "truncated": "    self.items.append(item)\n",
    }
    if kind in expected:
        assert body == expected[kind]
    else:  # shuffled: the same statements, the return no longer last
        assert sorted(body.splitlines()) == sorted(function.source.split('box."""\n', 1)[1].splitlines())
        assert not body.endswith("    return self.count\n")


def test_shuffling_is_offered_only_where_it_breaks_the_function(fake_stdlib: Path) -> None:
    found = _functions(fake_stdlib)
    assert ingest.applicable_corruptions(found["add"]) == ["pass", "not_implemented", "truncated", "shuffled"]
    assert ingest.applicable_corruptions(found["Box.stub"]) == ["pass", "not_implemented"]
    # a body that is already `pass` is never "corrupted" into itself
    pair = ingest.preference_for(found["Box.stub"], seed=0)
    assert pair is not None and pair["corruption"] == "not_implemented"


def test_seed_records_come_first_then_the_sampled_functions(fake_stdlib: Path) -> None:
    instructions, preferences, counts = ingest.ingest(
        seed=3, max_functions=3, seed_dir=SEED_DIR, root=fake_stdlib
    )
    seeds = ingest.read_seed(SEED_DIR)
    assert 25 <= len(seeds) <= 40
    assert instructions[: len(seeds)] == seeds
    assert seeds[0]["id"] == "seed:python_qa:1"
    assert len(instructions) == len(seeds) + 3 and len(preferences) == 3
    assert counts["instructions"] == len(instructions) and counts["preferences"] == 3
    for row in instructions:
        assert all(isinstance(row[name], str) and row[name].strip() for name in DATASETS["instructions"])
    # a function's instruction and preference share the prompt (split relies on it)
    assert [p["prompt"] for p in preferences] == [i["prompt"] for i in instructions[len(seeds) :]]
    assert all(
        p["chosen"] == i["completion"] for p, i in zip(preferences, instructions[len(seeds) :], strict=True)
    )


def _run(tmp_path: Path, name: str, seed: int, max_functions: int, root: Path | None) -> dict[str, bytes]:
    params = tmp_path / f"{name}.yaml"
    params.write_text(json.dumps({"seed": seed, "ingest": {"max_functions": max_functions}}))
    out = tmp_path / name
    argv = ["--params", str(params), "--seed-dir", str(SEED_DIR), "--out-dir", str(out)]
    argv += ["--report", str(out / "report.json")]
    if root is not None:
        argv += ["--source-root", str(root)]
    assert ingest.main(argv) == 0
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def test_the_same_seed_gives_the_same_bytes_and_another_seed_another_sample(
    tmp_path: Path, fake_stdlib: Path
) -> None:
    first = _run(tmp_path, "a", seed=7, max_functions=3, root=fake_stdlib)
    assert first == _run(tmp_path, "b", seed=7, max_functions=3, root=fake_stdlib)
    assert set(first) == {"instructions.jsonl", "preferences.jsonl", "report.json"}
    others = [
        _run(tmp_path, f"seed{seed}", seed=seed, max_functions=3, root=fake_stdlib) for seed in range(4)
    ]
    assert any(other["instructions.jsonl"] != first["instructions.jsonl"] for other in others)


def test_the_real_standard_library_is_ingested_deterministically(tmp_path: Path) -> None:
    first = _run(tmp_path, "a", seed=11, max_functions=150, root=None)
    assert first == _run(tmp_path, "b", seed=11, max_functions=150, root=None)
    rows = read_jsonl(tmp_path / "a" / "preferences.jsonl")
    assert len(rows) == 150
    assert {row["corruption"] for row in rows} == set(ingest.CORRUPTIONS)
    for row in rows:
        ast.parse(row["chosen"])
        ast.parse(row["rejected"])
        assert row["chosen"] != row["rejected"]
