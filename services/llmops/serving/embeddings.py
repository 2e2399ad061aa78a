"""Embeddings: a batch of texts or token ids through a model loaded to embed (a pooling model).

Every input is checked (non-empty, inside the model's context, token ids in its vocabulary) before
any reaches the engine; the batch then runs as one engine call, counted in flight so an unload drains it.
"""

from __future__ import annotations

from llmops.common.errors import FailedPrecondition, InvalidArgument
from llmops.serving.domain import EmbedRequest, EmbedResult
from llmops.serving.models import ServedModel
from llmops.serving.validation import check_prompt_size, check_token_ids

#: Inputs of one embeddings request (OpenAI's bound).
MAX_EMBED_INPUTS = 2048


async def embed(entry: ServedModel, request: EmbedRequest, request_id: str) -> EmbedResult:
    """The request's vectors from ``entry``'s engine, in input order."""
    engine = entry.engine
    assert engine is not None
    if not engine.is_embedding_model:
        raise FailedPrecondition(f"{entry.served_name} is loaded to generate, not to embed")
    if not 1 <= len(request.inputs) <= MAX_EMBED_INPUTS:
        raise InvalidArgument(f"1-{MAX_EMBED_INPUTS} inputs", field="input")
    batch: list[list[int]] = []
    for i, item in enumerate(request.inputs):
        field = f"input[{i}]"
        if isinstance(item, str):
            check_prompt_size(item, None, engine.max_model_len, field)
            ids = await engine.tokenize(item, add_special_tokens=True)
        else:
            check_token_ids(item, engine.vocab_size, field)
            ids = list(item)
        if not ids:
            raise InvalidArgument("must not be empty", field=field)
        if len(ids) > engine.max_model_len:
            raise InvalidArgument(
                f"{len(ids)} tokens exceed the model's context of {engine.max_model_len}", field=field
            )
        batch.append(ids)
    in_flight = entry.enter()
    try:
        vectors = await engine.embed(batch)
    finally:
        entry.leave(in_flight)
    return EmbedResult(
        request_id=request_id,
        served_name=entry.served_name,
        model=entry.info.model,
        embeddings=tuple(tuple(v) for v in vectors),
        prompt_tokens=sum(len(ids) for ids in batch),
    )
