"""Routing policies: pure, synchronous choices among the ready replicas of one model.

- round robin: each candidate in turn.
- least loaded: power of two choices: the less loaded (queued plus running) of two drawn at random,
  which balances nearly as well as a full scan without herding every router onto one replica.
- prefix affinity: the prompt is cut into blocks of ``block_chars`` characters and each block's hash
  chains the previous one (as vLLM's block hashes do), so hash ``i`` names the prompt's first ``i+1``
  blocks. The replica that last served the longest known chain gets the request while it is not
  saturated; else (a spill, counted) the least loaded, which then learns the chain too. Characters,
  not tokens: the router holds no tokenizer (it would have to load every model's and render the
  chat template on the hot path); equal leading characters of the same messages give equal leading
  tokens, which is what the engines' prefix caches key on. Token prompts hash token blocks.
- session affinity: rendezvous hashing of the session id over the candidates, so a session stays on
  its replica while the replica is ready and only that replica's sessions move when one leaves.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from llmops.common.errors import InvalidArgument
from llmops.router.endpoints import Endpoint, ModelSlot

Candidate = tuple[Endpoint, ModelSlot]


class Policy(enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    PREFIX_AFFINITY = "prefix_affinity"
    SESSION_AFFINITY = "session_affinity"

    @classmethod
    def parse(cls, text: str, header: str) -> Policy:
        try:
            return cls(text.strip().lower().replace("-", "_"))
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise InvalidArgument(
                f"unknown routing policy {text!r}; choose one of {choices}", field=header
            ) from None


@dataclass(slots=True)
class Decision:
    """The replica picked, and what the policy found (for statistics)."""

    endpoint: Endpoint
    slot: ModelSlot
    policy: Policy
    outcome: str  # chosen | prefix_hit | prefix_miss | spill


def prompt_blocks(text: str, block_chars: int, max_blocks: int) -> list[int]:
    """Chained hashes of the leading blocks of ``text`` (the last block may be partial)."""
    hashes: list[int] = []
    previous = 0
    end = min(len(text), block_chars * max_blocks)
    for start in range(0, end, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        hashes.append(previous)
    return hashes


def token_blocks(tokens: Sequence[int], block_tokens: int, max_blocks: int) -> list[int]:
    hashes: list[int] = []
    previous = 0
    end = min(len(tokens), block_tokens * max_blocks)
    for start in range(0, end, block_tokens):
        previous = hash((previous, tuple(tokens[start : start + block_tokens])))
        hashes.append(previous)
    return hashes


class Policies:
    """The policies' shared state: the round-robin position and the prefix table."""

    def __init__(self, *, saturation_waiting: int, table_size: int, seed: int | None = None) -> None:
        self.saturation_waiting = saturation_waiting
        self._table: OrderedDict[int, str] = OrderedDict()  # block-chain hash -> replica address
        self._table_size = table_size
        self._turn = 0
        self._random = random.Random(seed)

    def choose(
        self, policy: Policy, candidates: list[Candidate], blocks: list[int], session: str
    ) -> Decision:
        """Pick one of ``candidates`` (never empty) under ``policy``."""
        if len(candidates) == 1:
            endpoint, slot = candidates[0]
            if policy is Policy.PREFIX_AFFINITY and blocks:
                hit = self._holder(candidates, blocks) is not None
                self._learn(blocks, endpoint.address)
                return Decision(endpoint, slot, policy, "prefix_hit" if hit else "prefix_miss")
            return Decision(endpoint, slot, policy, "chosen")
        if policy is Policy.ROUND_ROBIN:
            self._turn += 1
            endpoint, slot = candidates[self._turn % len(candidates)]
            return Decision(endpoint, slot, policy, "chosen")
        if policy is Policy.LEAST_LOADED:
            endpoint, slot = self.least_loaded(candidates)
            return Decision(endpoint, slot, policy, "chosen")
        if policy is Policy.SESSION_AFFINITY:
            endpoint, slot = max(candidates, key=lambda c: _rendezvous(session, c[0].address))
            return Decision(endpoint, slot, policy, "chosen")
        return self._prefix(candidates, blocks)

    def least_loaded(self, candidates: list[Candidate]) -> Candidate:
        a, b = self._random.sample(candidates, 2)
        load_a, load_b = a[0].load(a[1]), b[0].load(b[1])
        if load_a != load_b:
            return a if load_a < load_b else b
        return a if a[0].in_flight <= b[0].in_flight else b

    def _prefix(self, candidates: list[Candidate], blocks: list[int]) -> Decision:
        if not blocks:
            endpoint, slot = self.least_loaded(candidates)
            return Decision(endpoint, slot, Policy.PREFIX_AFFINITY, "prefix_miss")
        holder = self._holder(candidates, blocks)
        if holder is not None and not holder[0].saturated(holder[1], self.saturation_waiting):
            outcome, chosen = "prefix_hit", holder
        else:
            outcome = "spill" if holder is not None else "prefix_miss"
            chosen = self.least_loaded(candidates)
        self._learn(blocks, chosen[0].address)
        return Decision(chosen[0], chosen[1], Policy.PREFIX_AFFINITY, outcome)

    def _holder(self, candidates: list[Candidate], blocks: list[int]) -> Candidate | None:
        """The candidate that served the longest known chain of ``blocks``."""
        table = self._table
        for block in reversed(blocks):
            address = table.get(block)
            if address is not None:
                for candidate in candidates:
                    if candidate[0].address == address:
                        return candidate
        return None

    def _learn(self, blocks: list[int], address: str) -> None:
        table = self._table
        for block in blocks:
            table[block] = address
            table.move_to_end(block)
        while len(table) > self._table_size:
            table.popitem(last=False)

    @property
    def table_entries(self) -> int:
        return len(self._table)


def _rendezvous(session: str, address: str) -> int:
    # stable across router replicas and restarts (Python's own hash of str is salted per process)
    return int.from_bytes(hashlib.blake2b(f"{session}|{address}".encode(), digest_size=8).digest(), "big")
