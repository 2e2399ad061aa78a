"""SFT learns only what the model should say: the loss mask is exact for every data format.

Invariants (with the real tiny tokenizer and its chat template): ``text`` trains on every token and
the EOS; ``prompt_completion`` masks the prompt out and trains on the completion and EOS, which
decode back to the completion; ``chat`` trains only on assistant content and its end marker, never on
role headers or system/user turns; examples are truncated to ``max_seq_length``, one with no target
token left is dropped, and a dataset with none left is an error rather than a silent no-op job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llmops.training.domain import DataFormat, WorkerPlan
from llmops.training.worker import tokenize_sft

END = "<|end|>"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from llmops.common.tiny_model import build_tiny_model

    return AutoTokenizer.from_pretrained(build_tiny_model().path)


def _plan(data_format: DataFormat, max_seq_length: int = 1024) -> WorkerPlan:
    return WorkerPlan(
        job_id="tj-1",
        method="sft",
        data_format=data_format,
        base_dir="/base",
        dataset_file="/job/dataset.jsonl",
        checkpoint_dir="/job/checkpoints",
        output_dir="/job/output",
        num_epochs=1.0,
        max_steps=-1,
        batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=2e-5,
        lr_scheduler="cosine",
        warmup_steps=0,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_seq_length=max_seq_length,
        precision="fp32",
        gradient_checkpointing=False,
        seed=42,
        eval_split=0.0,
        eval_every_steps=0,
        checkpoint_every_steps=0,
        logging_every_steps=10,
        dpo_beta=0.1,
        device="cpu",
    )


def _spans(ids: list[int], mask: list[int], value: int = 1) -> Iterator[list[int]]:
    """The maximal runs of ``ids`` whose mask is ``value``."""
    run: list[int] = []
    for token, bit in zip(ids, mask, strict=True):
        if bit == value:
            run.append(token)
        elif run:
            yield run
            run = []
    if run:
        yield run


def test_text_trains_on_every_token_and_the_eos(tokenizer: Any) -> None:
    [example] = tokenize_sft(_plan("text"), tokenizer, [{"text": "import os\nprint(os.sep)\n"}])
    ids, mask = example["input_ids"], example["assistant_masks"]
    assert ids[-1] == tokenizer.eos_token_id and set(mask) == {1} and len(mask) == len(ids)
    assert tokenizer.decode(ids[:-1]) == "import os\nprint(os.sep)\n"


def test_prompt_completion_trains_on_the_completion_and_eos_only(tokenizer: Any) -> None:
    row = {"prompt": "def add_3(x):\n", "completion": "    return x + 3\n"}
    [example] = tokenize_sft(_plan("prompt_completion"), tokenizer, [row])
    ids, mask = example["input_ids"], example["assistant_masks"]
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    [target] = _spans(ids, mask)
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target[:-1]) == row["completion"]
    assert tokenizer.decode(ids) == row["prompt"] + row["completion"] + tokenizer.eos_token


def test_an_empty_prompt_trains_on_the_whole_completion(tokenizer: Any) -> None:
    [example] = tokenize_sft(_plan("prompt_completion"), tokenizer, [{"prompt": "", "completion": "x = 1"}])
    assert set(example["assistant_masks"]) == {1}
    assert tokenizer.decode(example["input_ids"]) == "x = 1" + tokenizer.eos_token


CHAT = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Add 1 to x."},
    {"role": "assistant", "content": "return x + 1"},
    {"role": "user", "content": "Now subtract 2."},
    {"role": "assistant", "content": "return x - 2"},
]


def test_chat_trains_on_assistant_content_and_its_end_marker_only(tokenizer: Any) -> None:
    [example] = tokenize_sft(_plan("chat"), tokenizer, [{"messages": CHAT}])
    ids, mask = example["input_ids"], example["assistant_masks"]
    # the whole conversation is there, rendered by the model's own template
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    targets = [tokenizer.decode(span) for span in _spans(ids, mask)]
    # each assistant turn, its end marker, and nothing but the template's line break after it
    assert [t.removesuffix("\n") for t in targets] == [
        f"{m['content']}{END}" for m in CHAT if m["role"] == "assistant"
    ]
    context = "".join(tokenizer.decode(span) for span in _spans(ids, mask, value=0))
    for message in CHAT:
        if message["role"] != "assistant":
            assert message["content"] in context
    for header in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert header in context and all(header not in t for t in targets)


def test_examples_are_truncated_to_max_seq_length(tokenizer: Any) -> None:
    rows = [{"prompt": "def f(x):\n", "completion": "    return x * 2 + 1  # a long line\n"}]
    [full] = tokenize_sft(_plan("prompt_completion"), tokenizer, rows)
    limit = len(full["input_ids"]) - 3
    [cut] = tokenize_sft(_plan("prompt_completion", max_seq_length=limit), tokenizer, rows)
    assert cut["input_ids"] == full["input_ids"][:limit]
    assert cut["assistant_masks"] == full["assistant_masks"][:limit]
    # a chat cut inside its second assistant turn keeps the first turn's targets whole
    [whole] = tokenize_sft(_plan("chat"), tokenizer, [{"messages": CHAT}])
    second_turn = [i for i, bit in enumerate(whole["assistant_masks"]) if bit][-1] - 2
    [chat] = tokenize_sft(_plan("chat", max_seq_length=second_turn), tokenizer, [{"messages": CHAT}])
    assert len(chat["input_ids"]) == second_turn
    first, *rest = (tokenizer.decode(span) for span in _spans(chat["input_ids"], chat["assistant_masks"]))
    assert first.startswith(f"return x + 1{END}") and len(rest) == 1 and "return x - 2".startswith(rest[0])


def test_an_example_without_targets_after_truncation_is_dropped(tokenizer: Any) -> None:
    long_prompt = {"prompt": "def f(x):\n" * 20, "completion": "    return x\n"}
    short = {"prompt": "", "completion": "    return x\n"}
    prompt_length = len(tokenizer(long_prompt["prompt"])["input_ids"])
    plan = _plan("prompt_completion", max_seq_length=prompt_length)
    examples = tokenize_sft(plan, tokenizer, [long_prompt, short, long_prompt])
    assert len(examples) == 1 and tokenizer.decode(examples[0]["input_ids"]).startswith("    return x")
    with pytest.raises(ValueError, match="max_seq_length"):
        tokenize_sft(plan, tokenizer, [long_prompt, long_prompt])


def test_a_chat_whose_assistant_turn_is_cut_off_is_dropped(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="no example keeps a token"):
        tokenize_sft(_plan("chat", max_seq_length=16), tokenizer, [{"messages": messages}])
