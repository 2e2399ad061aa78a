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
from llmops.serving.domain import ChatMessage, Tool
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

    @property
    def chat_template(self) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else ""

    def encode_chat(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool, tools: Sequence[Tool] = ()
    ) -> list[int]:
        if not self.chat_template:
            raise InvalidArgument("this model has no chat template: send a text prompt", field="prompt.chat")
        conversation = [_message(m) for m in messages]
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = [
                {"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": json.loads(t.parameters or '{"type": "object"}')}}
                for t in tools
            ]  # fmt: skip
        try:
            rendered = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
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


def _message(m: ChatMessage) -> dict[str, Any]:
    """A turn as chat templates expect it (OpenAI's shape: tool calls with JSON-text arguments)."""
    turn: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        turn["name"] = m.name
    if m.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        turn["tool_call_id"] = m.tool_call_id
    return turn


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


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether a config names a generating architecture (else an encoder, loaded to embed)."""
    architectures = config.get("architectures") or ["ForCausalLM"]
    return any(
        str(a).endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures
    )


def sentence_pooling(path: Path) -> tuple[str, bool]:
    """(pooling mode "mean" | "cls", normalize) from a sentence-transformers layout; mean and no
    normalizing for a plain encoder."""
    mode, normalize = "mean", False
    try:
        pooling = json.loads((Path(path) / "1_Pooling" / "config.json").read_text())
        if pooling.get("pooling_mode_cls_token"):
            mode = "cls"
    except (OSError, ValueError):
        pass
    try:
        modules = json.loads((Path(path) / "modules.json").read_text())
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    except (OSError, ValueError, AttributeError):
        pass
    return mode, normalize


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
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool, tools: Sequence[Tool] = ()
    ) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    @property
    def chat_template(self) -> str:
        return self.tokenizer.chat_template

    @property
    def hf_tokenizer(self) -> Any:
        return self.tokenizer.tokenizer

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return self.tokenizer.token_strings(token_ids)
