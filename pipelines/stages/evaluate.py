"""Evaluate: perplexity of the fine-tuned version and of the current champion on ``eval.jsonl``, and
their answers to a few held-out prompts.

Perplexity is exp(mean cross-entropy) over the completion tokens of the first ``max_rows`` eval rows
(the prompt is context, as in training). Both models are downloaded from the registry (checksums
verified). Writes ``reports/eval.json`` (a DVC metrics file).

    python -m stages.evaluate [--params params.yaml]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import load_params, parser, pipeline_path, read_jsonl
from .services import download, read_json, report, resolve_alias, stack


def perplexity(folder: Path, rows: list[dict[str, Any]], max_len: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids = (prompt + completion)[:max_len]
            if len(ids) <= len(prompt):
                continue
            labels = [-100] * len(prompt) + ids[len(prompt) :]
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            targets = len(ids) - len(prompt)
            total += float(out.loss) * targets
            count += targets
    return math.exp(total / count) if count else math.nan


def answers(folder: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    found = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            found.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    params: dict[str, Any] = load_params(args.params)["evaluate"]
    record = stack()
    rows = read_jsonl(pipeline_path("data/prepared/eval.jsonl"))[: int(params["max_rows"])]
    prompts = [row["prompt"] for row in rows[: int(params["sample_prompts"])]]
    candidate = read_json(pipeline_path("reports/train.json"))["version"]
    champion_version = resolve_alias(record["model"], "champion")
    models = {"candidate": (candidate["name"], int(candidate["version"]))}
    if champion_version is not None:
        models["champion"] = (record["model"], champion_version)
    results: dict[str, Any] = {}
    for role, (name, version) in models.items():
        folder = download(name, version)
        results[role] = {
            "model": f"{name}:{version}",
            "perplexity": perplexity(folder, rows, int(params["max_len"])),
            "answers": answers(folder, prompts, int(params["max_new_tokens"])),
        }
        print(f"evaluate: {role} {name}:{version} perplexity {results[role]['perplexity']:.3f}")
    results["prompts"] = prompts
    results["rows"] = len(rows)
    report("eval", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
