"""Traffic-split weights between a model's aliases (champion 90, challenger 10), with history.

A model has one weight set at a time: alias -> non-negative integer, the share of requests a router
sends to the version the alias points at is ``weight / sum(weights)``. Every change makes a new
*revision* (1, 2, 3...; 0 means weights were never set, and a router then sends everything to the
alias the client asked for). A change is a compare-and-set on the revision (``expected_revision``),
so a rollout controller that read revision 7 cannot overwrite a change someone made meanwhile: it
gets ABORTED, re-reads and decides again.

Rules, checked by the store under the model's lock (the same lock alias moves take):

- every weight is an integer in [0, MAX_WEIGHT], their sum is > 0 (INVALID_ARGUMENT);
- every alias named exists now (FAILED_PRECONDITION: point the alias at a version first);
- an alias with a positive weight cannot be deleted (FAILED_PRECONDITION: set its weight to 0
  first), so a weight never routes to nothing;
- setting the weights they already have records nothing and keeps the revision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from llmops.common.errors import Aborted, FailedPrecondition, InvalidArgument
from llmops.registry.domain import check_alias_name
from llmops.registry.requests import MAX_ALIASES

#: Largest weight: percentages, per-mille and the like fit; sums stay far from any overflow.
MAX_WEIGHT = 1_000_000


@dataclass(frozen=True)
class AliasWeights:
    """One revision of a model's traffic split (revision 0: never set, no split)."""

    model_name: str
    revision: int = 0
    weights: dict[str, int] = field(default_factory=dict)
    previous_weights: dict[str, int] = field(default_factory=dict)
    set_by: str = ""
    set_at: datetime | None = None
    reason: str = ""

    def share(self, alias: str) -> float:
        """The fraction of traffic ``alias`` gets (0.0 when weights are unset)."""
        total = sum(self.weights.values())
        return self.weights.get(alias, 0) / total if total else 0.0


def check_weights(weights: Mapping[str, int], field_name: str = "weights") -> dict[str, int]:
    """Valid weights as a plain dict, else ``InvalidArgument`` naming the offending entry."""
    if not weights:
        raise InvalidArgument("at least one alias with a weight is required", field=field_name)
    if len(weights) > MAX_ALIASES:
        raise InvalidArgument(f"at most {MAX_ALIASES} aliases", field=field_name)
    out: dict[str, int] = {}
    for alias, weight in weights.items():
        check_alias_name(alias, f"{field_name}[{alias}]")
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise InvalidArgument("must be an integer", field=f"{field_name}[{alias}]")
        if not 0 <= weight <= MAX_WEIGHT:
            raise InvalidArgument(
                f"must be in [0, {MAX_WEIGHT}], got {weight}", field=f"{field_name}[{alias}]"
            )
        out[alias] = weight
    if sum(out.values()) <= 0:
        raise InvalidArgument("the weights must not all be 0", field=field_name)
    return out


def check_weights_change(
    current: AliasWeights, weights: Mapping[str, int], aliases: Mapping[str, int], expected: int | None
) -> None:
    """The rules a store applies under the model's lock before recording ``weights``.

    Args:
        current: the weights in force now.
        weights: the checked new weights.
        aliases: the model's aliases now (alias -> version).
        expected: None for an unconditional change, else the revision the caller read.

    Raises:
        Aborted: ``expected`` is not the current revision (someone changed the weights meanwhile).
        FailedPrecondition: an alias named does not exist.
    """
    if expected is not None and expected != current.revision:
        raise Aborted(
            f"weights of model {current.model_name!r} are at revision {current.revision}, "
            f"expected {expected}: read them again and retry"
        )
    missing = sorted(a for a in weights if a not in aliases)
    if missing:
        raise FailedPrecondition(
            f"model {current.model_name!r} has no alias {', '.join(missing)}: point it at a version first"
        )


def check_alias_delete(current: AliasWeights, alias: str) -> None:
    """``FailedPrecondition`` when deleting ``alias`` would leave a positive weight routing to nothing."""
    if current.weights.get(alias, 0) > 0:
        raise FailedPrecondition(
            f"alias {alias!r} carries traffic weight {current.weights[alias]} "
            f"(revision {current.revision}): set its weight to 0 first"
        )
