"""Seeded workloads and Poisson arrival schedules of the router benchmark (pure: no I/O, no model).

A :class:`Schedule` is the list of requests one arm sends at one rung of the QPS ladder: when each
request leaves (seconds after the start), its prompt, and the group (tenant, user) it belongs to.
Every arm gets the same schedule: the same arrival times, the same groups and questions in the same
order. Only the *text* of the prompts may change between arms, through ``salt``: the words differ,
their number does not, so an arm never finds the previous arm's prefixes in an engine's cache (the
stale blocks are the least recently used, evicted first) without restarting the engines.

Workloads (the issue's four):

- ``A`` shared-prefix tenants: ``groups`` long system prompts, ``per_group`` short questions each,
  in a seeded random order;
- ``B`` multi-turn chat: each user's prompt grows turn by turn (the previous turns, a fixed reply
  each, then a new question); a user's turns keep their order;
- ``C`` zero reuse: prompts as long as A's, each unique from its first word;
- ``D`` hot prefix: as A, but half the requests belong to group 0.

The text is made of common English words, so a tokenizer sees ordinary text; ``count_tokens`` (the
real tokenizer in the benchmark, a words-based estimate by default) sizes the prefixes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

WORKLOADS = ("A", "B", "C", "D")

_WORD_TEXT = (
    "account action answer area article bank basis benefit board book budget business call car case "
    "center chance change child choice city class client company cost country course credit culture "
    "customer data day deal decision degree design detail development direction disease door doubt "
    "effect effort energy engine event evidence example experience expert fact factor family feature "
    "field figure film focus food form friend future game garden goal government group growth health "
    "history home hospital hotel house idea image impact income industry interest issue job key kind "
    "land language law leader letter level library light line list market material matter meeting "
    "member memory method minute model money month morning mother movement music name nature network "
    "news number object office oil order owner page paper party patient pattern payment people period "
    "person picture piece place plan plant player point policy position power practice pressure price "
    "problem process product program project property purpose quality question radio range rate reason "
    "record region report research resource response result river road role room rule safety sale "
    "scene school science season section security sense series service share side sign site size skill "
    "society software source space speech staff stage standard state station step story strategy "
    "street structure student study style subject success summer support surface system table task team "
    "term test theory thing time tool topic town trade training travel tree trouble truth type unit "
    "user value version view voice water way week weight window winter word work world year"
)
_WORDS = tuple(_WORD_TEXT.split())
_QUESTIONS = (
    "What is the first step?", "Who should be told?", "How long will it take?", "What does it cost?",
    "Which option is safer?", "Where do we start?", "Why does it matter?", "What could go wrong?",
    "How do we measure it?", "Who owns the result?", "When is it due?", "What comes next?",
)  # fmt: skip
#: A fixed assistant reply that multi-turn histories carry (open loop: no real output is fed back).
REPLY = "Thank you. I have noted that and will follow the plan step by step."


def estimate_tokens(text: str) -> int:
    """Roughly how many tokens a BPE tokenizer makes of plain English text (1.3 per word)."""
    return round(len(text.split()) * 1.3)


@dataclass(frozen=True)
class Request:
    """One request of a schedule."""

    index: int
    at: float  # seconds after the run's start
    prompt: str
    group: int  # tenant (A, D), user (B) or -1 (C)
    turn: int = 0  # multi-turn: 0-based turn of the user


@dataclass(frozen=True)
class Schedule:
    """What one arm sends at one rung: the requests in order of departure."""

    workload: str
    rate: float  # offered requests per second
    requests: tuple[Request, ...]

    @property
    def duration(self) -> float:
        return self.requests[-1].at if self.requests else 0.0


@dataclass(frozen=True)
class Shape:
    """The size of a workload (the same for every arm and rung)."""

    groups: int = 24
    per_group: int = 8
    prefix_tokens: int = 384
    turns: int = 4  # B: turns per user (users = groups)
    turn_tokens: int = 48  # B: tokens each turn adds (a question and a reply)


def poisson_times(rate: float, count: int, rng: random.Random) -> list[float]:
    """``count`` departure times of a Poisson process of ``rate`` per second, the first at 0."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, not {rate}")
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def text_of(tokens: int, rng: random.Random, count_tokens: Callable[[str], int] = estimate_tokens) -> str:
    """Random words, ``tokens`` tokens long by ``count_tokens`` (never shorter)."""
    words: list[str] = []
    estimate = max(1, int(tokens / 1.3))
    words = [rng.choice(_WORDS) for _ in range(estimate)]
    while count_tokens(" ".join(words)) < tokens:
        words.append(rng.choice(_WORDS))
    while len(words) > 1 and count_tokens(" ".join(words[:-1])) >= tokens:
        words.pop()
    return " ".join(words)


def _prefix(group: int, shape: Shape, seed: int, salt: str, count: Callable[[str], int]) -> str:
    rng = random.Random(f"{seed}/{salt}/prefix/{group}")
    return f"System: you are assistant {group}. " + text_of(shape.prefix_tokens, rng, count) + "\n"


def _order(workload: str, shape: Shape, rng: random.Random) -> list[tuple[int, int]]:
    """(group, item) pairs in sending order; the same for every arm."""
    if workload in ("A", "C"):
        pairs = [(g, i) for g in range(shape.groups) for i in range(shape.per_group)]
        rng.shuffle(pairs)
        return pairs
    if workload == "D":
        total = shape.groups * shape.per_group
        hot = total // 2
        pairs = [(0, i) for i in range(hot)]
        others = max(1, shape.groups - 1)
        pairs += [(1 + k % others, k // others) for k in range(total - hot)]
        rng.shuffle(pairs)
        return pairs
    if workload == "B":
        remaining = {u: 0 for u in range(shape.groups)}
        pairs = []
        while remaining:
            user = rng.choice(sorted(remaining))
            pairs.append((user, remaining[user]))
            remaining[user] += 1
            if remaining[user] == shape.turns:
                del remaining[user]
        return pairs
    raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")


def build(
    workload: str,
    rate: float,
    *,
    shape: Shape,
    seed: int,
    salt: str = "",
    count_tokens: Callable[[str], int] = estimate_tokens,
) -> Schedule:
    """The schedule of ``workload`` at ``rate`` requests/s.

    ``seed`` fixes the order and the arrival times (shared by every arm); ``salt`` only changes
    the words of the prompts (give each arm and repeat its own).
    """
    order_rng = random.Random(f"{seed}/{workload}/order")
    pairs = _order(workload, shape, order_rng)
    times = poisson_times(rate, len(pairs), random.Random(f"{seed}/{workload}/{rate:.6f}/times"))
    prefixes: dict[int, str] = {}
    requests = []
    for index, ((group, item), at) in enumerate(zip(pairs, times, strict=True)):
        question = _QUESTIONS[(group * 7 + item) % len(_QUESTIONS)]
        if workload == "C":
            rng = random.Random(f"{seed}/{salt}/unique/{index}")
            body = f"System: you are assistant {index}. " + text_of(shape.prefix_tokens, rng, count_tokens)
            requests.append(Request(index, at, f"{body}\nUser: {question}\nAssistant:", -1))
            continue
        if group not in prefixes:
            prefixes[group] = _prefix(group, shape, seed, salt, count_tokens)
        if workload == "B":
            history = "".join(
                f"User: {_turn_text(group, t, shape, seed, salt, count_tokens)}\nAssistant: {REPLY}\n"
                for t in range(item)
            )
            latest = _turn_text(group, item, shape, seed, salt, count_tokens)
            prompt = f"{prefixes[group]}{history}User: {latest}\nAssistant:"
            requests.append(Request(index, at, prompt, group, turn=item))
            continue
        requests.append(Request(index, at, f"{prefixes[group]}User: {question}\nAssistant:", group))
    return Schedule(workload, rate, tuple(requests))


def _turn_text(user: int, turn: int, shape: Shape, seed: int, salt: str, count: Callable[[str], int]) -> str:
    rng = random.Random(f"{seed}/{salt}/turn/{user}/{turn}")
    reply_tokens = count(REPLY)
    return text_of(max(4, shape.turn_tokens - reply_tokens), rng, count) + "?"


def ideal_hit_tokens(prompts: list[list[int]], block_size: int) -> tuple[int, int]:
    """(tokens an infinite prefix cache would hit, tokens queried) over prompts sent in this order.

    Like vLLM: a prompt's tokens hit in whole blocks, from its start, up to the first block whose
    chain of blocks no earlier prompt had; the last token is always computed.
    """
    seen: set[tuple[int, ...]] = set()
    hits = queried = 0
    for ids in prompts:
        queried += len(ids)
        usable = (len(ids) - 1) // block_size
        matched, chain_open = 0, True
        for b in range(usable):
            key = tuple(ids[: (b + 1) * block_size])
            if chain_open and key in seen:
                matched += 1
            else:
                chain_open = False
            seen.add(key)
        hits += matched * block_size
    return hits, queried
