"""Evaluate: completion perplexity of every variant of the candidate (the full-precision fine-tune and
its quantized children) and of the current champion, on the same rows of ``eval.jsonl``, and their
answers to a few held-out prompts.

Perplexity is exp(mean cross-entropy) over the completion tokens of the first ``max_rows`` eval rows
(the prompt is context, as in training), computed the same way for every model: what is promoted is
measured on the champion's evaluation set. Models are downloaded from the registry (checksums
verified); a quantized folder of our own formats loads through ``llmops.common.formats``, the
rest through ``from_pretrained``. Each entry also names the engine that would serve the model
(``vllm`` or ``transformers``, from its folder), for the speed stage. Writes ``reports/eval.json`` (a
DVC metrics file).

    python -m stages.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import load_params, parser, pipeline_path, read_jsonl
from .services import download, read_json, report, resolve_alias, serving_engine, stack, version_format


def load(folder: Path) -> Any:
    """The model in ``folder`` on the CPU, in eval mode (our quantized formats through their loader)."""
    from transformers import AutoModelForCausalLM

    from llmops.common.formats import load_model, own_quant_method

    own = own_quant_method(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    if own:
        return load_model(folder, own)
    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval()


def perplexity(folder: Path, rows: list[dict[str, Any]], max_len: int) -> float:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load(folder)
    total, count = 0.0, 0
    with torch.no_grad():  # not inference_mode: quanto tensors need version counters
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
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load(folder)
    found: list[str] = []
    with torch.no_grad():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            found.append(
                str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
            )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    params: dict[str, Any] = load_params(args.params)["evaluate"]
    record = stack()
    rows = read_jsonl(pipeline_path("data/prepared/eval.jsonl"))[: int(params["max_rows"])]
    prompts = [row["prompt"] for row in rows[: int(params["sample_prompts"])]]
    candidate = read_json(pipeline_path("reports/train.json"))["version"]
    quantized = read_json(pipeline_path("reports/quantize.json"))["version"]
    parent = f"{candidate['name']}:{candidate['version']}"
    # (role, name, version, the variant it was quantized from)
    models = [
        ("variant", str(candidate["name"]), int(candidate["version"]), ""),
        ("variant", str(quantized["name"]), int(quantized["version"]), parent),
    ]
    champion_version = resolve_alias(record["model"], "champion")
    if champion_version is not None:
        models.insert(0, ("champion", record["model"], champion_version, ""))
    results: dict[str, Any] = {"rows": len(rows), "prompts": prompts, "variants": []}
    for role, name, version, quantized_from in models:
        folder = download(name, version)
        entry = {
            "model": f"{name}:{version}",
            "format": version_format(name, version),
            "engine": serving_engine(folder),
            "perplexity": perplexity(folder, rows, int(params["max_len"])),
            "answers": answers(folder, prompts, int(params["max_new_tokens"])),
        }
        if role == "champion":
            results["champion"] = entry
        else:
            results["variants"].append({**entry, "quantized_from": quantized_from})
        print(
            f"evaluate: {role} {entry['model']} ({entry['format']}, served on {entry['engine']}) "
            f"perplexity {entry['perplexity']:.3f}"
        )
    report("eval", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
