"""Build: the files the services read, in the formats the training service accepts.

From ``data/split/<split>/<dataset>.jsonl``:

========================== ===================== ======================================================
file                       from                  rows
========================== ===================== ======================================================
``sft.jsonl``              train instructions    ``prompt``/``completion`` (training format
                                                 ``prompt_completion``: the loss is on the completion)
``dpo.jsonl``              train preferences     ``prompt``/``chosen``/``rejected`` (``preference``)
``eval.jsonl``             eval instructions     ``prompt``/``completion``
``eval.txt``               eval instructions     plain text, as ``calibration.txt`` (the quantization
                                                 job's perplexity before and after)
``calibration.txt``        calibration           plain text: each record's prompt and completion,
                           instructions          records separated by a blank line
========================== ===================== ======================================================

Every prompt is wrapped in ``build.prompt_template`` (its ``{prompt}`` replaced), the same for SFT,
DPO and evaluation, so the model sees one prompt shape everywhere. Rows carry only their format's
fields. Each JSON-lines file is checked with ``llmops.training.data.validate_rows`` before it is
written, so a file this stage writes is one the training service takes.

    python -m stages.build [--params params.yaml] [--in-dir data/split] [--out-dir data/prepared]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .common import Record, dumps_jsonl, load_params, parser, pipeline_path, read_jsonl

DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
#: Output file -> (training data format, a method that trains on it); calibration.txt is plain text.
OUTPUTS: dict[str, tuple[str, str]] = {
    "sft.jsonl": ("prompt_completion", "sft"),
    "dpo.jsonl": ("preference", "dpo"),
    "eval.jsonl": ("prompt_completion", "sft"),
}


def render_prompt(prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
    if "{prompt}" not in template:
        raise ValueError("build.prompt_template must contain {prompt}")
    return template.replace("{prompt}", prompt)


def sft_rows(records: Sequence[Record], template: str = DEFAULT_TEMPLATE) -> list[Record]:
    return [{"prompt": render_prompt(r["prompt"], template), "completion": r["completion"]} for r in records]


def dpo_rows(records: Sequence[Record], template: str = DEFAULT_TEMPLATE) -> list[Record]:
    return [
        {"prompt": render_prompt(r["prompt"], template), "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in records
    ]


def calibration_text(records: Sequence[Record], template: str = DEFAULT_TEMPLATE) -> str:
    return (
        "\n\n".join(render_prompt(r["prompt"], template) + r["completion"].rstrip("\n") for r in records)
        + "\n"
    )


def build(
    splits: Mapping[str, Mapping[str, Sequence[Record]]], template: str = DEFAULT_TEMPLATE
) -> dict[str, str]:
    """``{file name: content}`` from ``{split: {dataset: records}}``; the JSON-lines files validated.

    Raises:
        ValueError: a file would be empty, or a row is one the training service would refuse.
    """
    contents = {
        "sft.jsonl": dumps_jsonl(sft_rows(splits["train"]["instructions"], template)),
        "dpo.jsonl": dumps_jsonl(dpo_rows(splits["train"]["preferences"], template)),
        "eval.jsonl": dumps_jsonl(sft_rows(splits["eval"]["instructions"], template)),
    }
    for name, content in contents.items():
        check_training_rows(name, content)
    contents["eval.txt"] = calibration_text(splits["eval"]["instructions"], template)
    calibration = splits["calibration"]["instructions"]
    if not calibration:
        raise ValueError("calibration.txt: no calibration records (raise split.calibration or ingest more)")
    contents["calibration.txt"] = calibration_text(calibration, template)
    return contents


def check_training_rows(name: str, content: str) -> int:
    """``validate_rows`` of the training service on ``content`` as ``OUTPUTS[name]`` says; the rows."""
    from llmops.common.errors import InvalidArgument
    from llmops.training.data import validate_rows

    data_format, method = OUTPUTS[name]
    try:
        _, rows = validate_rows(content.encode("utf-8"), data_format, method)  # type: ignore[arg-type]
    except InvalidArgument as exc:
        raise ValueError(f"{name}: the training service would refuse it: {exc}") from None
    return rows


def read_splits(folder: Path) -> dict[str, dict[str, list[Record]]]:
    return {
        split.name: {path.stem: read_jsonl(path) for path in sorted(split.glob("*.jsonl"))}
        for split in sorted(folder.iterdir())
        if split.is_dir()
    }


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser(__doc__)
    cli.add_argument("--in-dir", type=Path, default=pipeline_path("data/split"))
    cli.add_argument("--out-dir", type=Path, default=pipeline_path("data/prepared"))
    args = cli.parse_args(argv)
    params: dict[str, Any] = load_params(args.params)
    template = str(params.get("build", {}).get("prompt_template", DEFAULT_TEMPLATE))
    contents = build(read_splits(args.in_dir), template)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        (args.out_dir / name).write_text(content, encoding="utf-8", newline="\n")
    counts = {name: content.count("\n") for name, content in contents.items() if name.endswith(".jsonl")}
    print(
        "build: "
        + ", ".join(f"{name} {rows} rows" for name, rows in counts.items())
        + f", eval.txt {len(contents['eval.txt'])} and calibration.txt {len(contents['calibration.txt'])} characters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
