"""A training spec's lists are bounded: past the limit, INVALID_ARGUMENT naming the field and limit."""

from __future__ import annotations

import pytest

from llmops.common.errors import InvalidArgument
from llmops.training.domain import DatasetRef, LoraSpec, TrainingSpec
from llmops.training.validation import MAX_ALIASES, check_spec


def _spec(aliases: int) -> TrainingSpec:
    names = tuple(f"a{i}" for i in range(aliases))
    return TrainingSpec(
        base_name="tiny", dataset=DatasetRef("data/sft.jsonl"), method="lora", lora=LoraSpec(), aliases=names
    )


def test_aliases_are_bounded() -> None:
    check_spec(_spec(MAX_ALIASES))
    with pytest.raises(InvalidArgument, match=f"at most {MAX_ALIASES} aliases") as error:
        check_spec(_spec(MAX_ALIASES + 1))
    assert error.value.field == "spec.aliases"
