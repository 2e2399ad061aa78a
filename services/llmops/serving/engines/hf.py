"""The Hugging Face tokenizer of a model folder, shared by the transformers and vLLM engines.

Both engines tokenize (and apply the chat template) here, so a prompt means the same token ids on
either, and the service can check prompt lengths before anything reaches an engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmops.common.errors import InvalidArgument, Unavailable
from llmops.serving.domain import ChatMessage
from llmops.serving.engines.base import Engine


class HFTokenizer:
    """Tokenizer, chat template and end-of-sequence ids of a model folder."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path))
        self.end_ids = end_token_ids(self.path, self.tokenizer)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument("this model has no chat template: send a text prompt", field="prompt.chat")
        conversation = [
            {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in messages
        ]
        try:
            rendered = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # jinja2's TemplateError, raise_exception() in the template
            raise InvalidArgument(
                f"the chat template refused the messages: {exc}", field="prompt.chat"
            ) from None
        # The template writes the special tokens (BOS, role markers) itself.
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [self.token_text(t) for t in token_ids]


def end_token_ids(path: Path, tokenizer: Any) -> list[int]:
    """EOS ids: the tokenizer's and those of ``generation_config.json`` (as vLLM reads them)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        config = json.loads((Path(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    eos = config.get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(i) for i in eos)
    return sorted(ids)


def read_config(path: Path) -> dict[str, Any]:
    """The model's ``config.json``."""
    try:
        config: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    except OSError:
        raise InvalidArgument(f"{path} holds no config.json: not a Hugging Face model folder") from None
    return config


class HFTokenizerEngine(Engine):
    """An engine that tokenizes with :class:`HFTokenizer` (set ``_tokenizer`` when it starts)."""

    _tokenizer: HFTokenizer | None = None
    #: What callers are told while the tokenizer is not loaded yet (or any more).
    not_running_message = "the model is not loaded"

    @property
    def tokenizer(self) -> HFTokenizer:
        if self._tokenizer is None:
            raise Unavailable(self.not_running_message)
        return self._tokenizer

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def tokenize_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool
    ) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return self.tokenizer.token_strings(token_ids)
