"""The weights RPCs' logic: validation and paging over the store's weight methods (see :mod:`.weights`)."""

from __future__ import annotations

from collections.abc import Mapping

from llmops.common.errors import InvalidArgument
from llmops.registry.domain import Page, check_model_name
from llmops.registry.requests import (
    MAX_REASON_BYTES,
    check_text,
    decode_token,
    encode_token,
    page_size_or_default,
)
from llmops.registry.stores.base import RegistryStore
from llmops.registry.weights import AliasWeights, check_weights


class WeightsService:
    """Validation and paging of the weights RPCs over a store's weight methods."""

    def __init__(self, store: RegistryStore) -> None:
        self.store = store

    async def set_weights(
        self, name: str, weights: Mapping[str, int], *, expected: int | None, reason: str, caller: str
    ) -> AliasWeights:
        check_model_name(name, "model_name")
        checked = check_weights(weights)
        check_text(reason, MAX_REASON_BYTES, "reason")
        if expected is not None and expected < 0:
            raise InvalidArgument("must be >= 0", field="expected_revision")
        return await self.store.set_alias_weights(
            name, checked, expected=expected, set_by=caller, reason=reason
        )

    async def get_weights(self, name: str) -> tuple[AliasWeights, dict[str, int]]:
        """The weights in force and the model's aliases (alias -> version) read just after."""
        check_model_name(name, "model_name")
        weights = await self.store.get_alias_weights(name)
        model = await self.store.get_model(name)
        return weights, dict(model.aliases)

    async def history(self, name: str, *, page_size: int, page_token: str) -> Page[AliasWeights]:
        check_model_name(name, "model_name")
        limit = page_size_or_default(page_size)
        offset = int(decode_token(page_token, int) or 0)
        if offset < 0:
            raise InvalidArgument("not a token this service issued", field="page_token")
        entries = await self.store.alias_weights_history(name, offset=offset, limit=limit + 1)
        more = len(entries) > limit
        return Page(tuple(entries[:limit]), encode_token(offset + limit) if more else "")
