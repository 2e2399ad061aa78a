"""Guided decoding for engines with their own decoding loop (transformers), on xgrammar.

The same library vLLM's CPU build picks for its structured outputs, used directly: a grammar is
compiled once per request from the constraint, and at each step every completion's logits are
masked to the tokens its grammar allows; the sampled token then advances that completion's matcher.
When the grammar is complete only an end token is allowed, so the completion stops there. JSON is
generated without free whitespace, as on vLLM (see :func:`vllm_engine.structured_outputs`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from llmops.common.errors import InvalidArgument
from llmops.serving.domain import StructuredOutput

MAX_CACHED = 64
#: JSON separators without blanks, as vLLM's xgrammar backend uses them.
SEPARATORS = (",", ":")


class Grammars:
    """Compiles constraints for one model's tokenizer (a few recent ones kept: clients repeat schemas).

    Args:
        tokenizer: the Hugging Face tokenizer.
        vocab_size: the model's logits width.
        end_ids: tokens that end a completion.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, end_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(end_ids)
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[StructuredOutput, Any] = OrderedDict()

    def compile(self, constraint: StructuredOutput) -> Any:
        """The compiled grammar; INVALID_ARGUMENT for what xgrammar cannot enforce."""
        if constraint in self._compiled:
            self._compiled.move_to_end(constraint)
            return self._compiled[constraint]
        compiler = self._compiler
        try:
            if constraint.json_schema is not None:
                grammar = compiler.compile_json_schema(
                    constraint.json_schema, any_whitespace=False, separators=SEPARATORS
                )
            elif constraint.json_object:
                grammar = compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, separators=SEPARATORS
                )
            elif constraint.regex is not None:
                grammar = compiler.compile_regex(constraint.regex)
            else:
                alternatives = " | ".join(json.dumps(c) for c in constraint.choice)
                grammar = compiler.compile_grammar(f"root ::= {alternatives}")
        except Exception as exc:  # RuntimeError for what xgrammar cannot compile, or its own errors
            raise InvalidArgument(
                f"the constraint cannot be enforced: {exc}", field="sampling.structured_output"
            ) from None
        self._compiled[constraint] = grammar
        while len(self._compiled) > MAX_CACHED:
            self._compiled.popitem(last=False)
        return grammar


class Guide:
    """Grammar matchers of one request's ``n`` completions decoded together."""

    def __init__(self, grammar: Any, vocab_size: int, n: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self._vocab_size = vocab_size
        self.matchers = [xgr.GrammarMatcher(grammar) for _ in range(n)]
        self._bitmask = xgr.allocate_token_bitmask(n, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with each completion's disallowed tokens at -inf; logits: (n, vocab)."""
        masked = logits.float().contiguous().clone()  # (n, vocab)
        for i, matcher in enumerate(self.matchers):
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self._bitmask, i)
        self._xgr.apply_token_bitmask_inplace(masked, self._bitmask, vocab_size=self._vocab_size)
        return masked

    def advance(self, index: int, token_id: int) -> None:
        """Feed the token completion ``index`` sampled to its matcher."""
        matcher = self.matchers[index]
        if not matcher.is_terminated():
            matcher.accept_token(token_id)
