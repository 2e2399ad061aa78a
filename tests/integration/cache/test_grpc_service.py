"""The cache service through a real gRPC server on port 0, backed by a real Redis.

Invariants: bad input gets INVALID_ARGUMENT naming the field (a parametrized table per RPC); a stored
output comes back whole (completions, logprobs, usage) under the same key, by full key or by the
digest a lookup returned; non-reproducible requests bypass and are not stored; aborted and oversized
outputs are not stored; entries never cross tenants; once an alias moves, a request through it
reaches the new version's keys (never the old answers), and Invalidate by alias / version / model
(optionally one tenant's) removes what it says; TTLs expire entries; Stats and /metrics count all
of it; health is SERVING with Redis up; `llmops cache stats|invalidate` drive the same API.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request

import grpc
import pytest
from google.protobuf import duration_pb2
from typer.testing import CliRunner

from llmops.cli import app as cli_app
from llmops.common.clients import CacheClient
from llmops.common.errors import InvalidArgument
from llmops.proto.cache.v1 import cache_service_pb2 as pb
from llmops.proto.common.v1 import generation_pb2, model_pb2, sampling_pb2, usage_pb2
from tests.integration.cache.conftest import RunningCache, unique_model

GREEDY = sampling_pb2.SamplingParams(greedy=True)


def key(
    name: str,
    version: int = 1,
    *,
    alias: str = "",
    text: str = "Hello",
    tenant: str = "",
    sampling: sampling_pb2.SamplingParams = GREEDY,
) -> pb.CacheKey:
    return pb.CacheKey(
        model=model_pb2.ResolvedModel(name=name, version=version, alias=alias),
        tenant=tenant,
        prompt=generation_pb2.Prompt(text=text),
        sampling=sampling,
    )


def output(
    text: str = "world", reason: int = generation_pb2.FINISH_REASON_STOP
) -> generation_pb2.GeneratedOutput:
    return generation_pb2.GeneratedOutput(
        completions=[
            generation_pb2.Completion(
                index=0,
                text=text,
                token_ids=[11, 12, 2],
                finish_reason=reason,
                logprobs=[
                    generation_pb2.TokenLogprob(
                        token_id=11, token="wo", logprob=-0.25, rank=1,
                        top_logprobs=[generation_pb2.TopLogprob(token_id=11, token="wo", logprob=-0.25)],
                    )
                ],
                cumulative_logprob=-1.5,
            )
        ],
        prompt_token_ids=[1, 5, 6],
        usage=usage_pb2.Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6),
    )  # fmt: skip


async def lookup(client: CacheClient, k: pb.CacheKey) -> pb.LookupResponse:
    return await client.unary(client.stub.Lookup, pb.LookupRequest(key=k))


async def store(
    client: CacheClient, k: pb.CacheKey, out: generation_pb2.GeneratedOutput | None = None, **extra: object
) -> pb.StoreResponse:
    return await client.unary(client.stub.Store, pb.StoreRequest(key=k, output=out or output(), **extra))


async def invalidate(client: CacheClient, **fields: object) -> int:
    return (await client.unary(client.stub.Invalidate, pb.InvalidateRequest(**fields))).removed


async def test_health_is_serving(cache_service: RunningCache) -> None:
    from grpc_health.v1 import health_pb2

    assert await cache_service.client.health() == health_pb2.HealthCheckResponse.SERVING


def _bad_keys() -> list[tuple[str, pb.CacheKey | None, str]]:
    ok = key("tiny")

    def changed(**fields: object) -> pb.CacheKey:
        k = pb.CacheKey()
        k.CopyFrom(ok)
        for name, value in fields.items():
            if value is None:
                k.ClearField(name)
            elif isinstance(value, str):
                setattr(k, name, value)
            else:
                getattr(k, name).CopyFrom(value)
        return k

    return [
        ("no key", None, "key"),
        ("no model", changed(model=None), "key.model"),
        ("bad model name", changed(model=model_pb2.ResolvedModel(name="Bad Name", version=1)), "model.name"),
        ("version 0", changed(model=model_pb2.ResolvedModel(name="tiny")), "model.version"),
        ("adapter version 0", changed(adapter=model_pb2.ResolvedModel(name="lora")), "adapter.version"),
        ("no prompt, no digest", changed(prompt=None), "key.prompt"),
        ("empty prompt", changed(prompt=generation_pb2.Prompt()), "key.prompt"),
        ("no tokens", changed(prompt=generation_pb2.Prompt(tokens=generation_pb2.PromptTokens())), "key.prompt.tokens.token_ids"),
        ("no messages", changed(prompt=generation_pb2.Prompt(chat=generation_pb2.ChatPrompt())), "key.prompt.chat.messages"),
        ("foreign digest", changed(digest="md5:abc"), "digest"),
        ("NaN temperature", changed(sampling=sampling_pb2.SamplingParams(temperature=math.nan, seed=1)), "sampling.temperature"),
        ("huge tenant", changed(tenant="t" * 1000), "tenant"),
    ]  # fmt: skip


BAD_KEYS = _bad_keys()


@pytest.mark.parametrize(("why", "bad_key", "field"), BAD_KEYS, ids=[c[0] for c in BAD_KEYS])
@pytest.mark.parametrize("rpc", ["Lookup", "Store"])
async def test_bad_keys_are_invalid_argument(
    cache_service: RunningCache, rpc: str, why: str, bad_key: pb.CacheKey | None, field: str
) -> None:
    client = cache_service.client
    if rpc == "Lookup":
        call = client.unary(client.stub.Lookup, pb.LookupRequest(key=bad_key))
    else:
        call = client.unary(client.stub.Store, pb.StoreRequest(key=bad_key, output=output()))
    with pytest.raises(InvalidArgument) as raised:
        await call
    assert raised.value.message.startswith(field), raised.value.message


BAD_OTHERS = [
    ("Store", pb.StoreRequest(key=key("tiny")), "output"),
    (
        "Store",
        pb.StoreRequest(key=key("tiny"), output=output(), ttl=duration_pb2.Duration(seconds=-1)),
        "ttl",
    ),
    ("Invalidate", pb.InvalidateRequest(), "model_name"),
    ("Invalidate", pb.InvalidateRequest(model_name="Tiny!"), "model_name"),
    ("Invalidate", pb.InvalidateRequest(model_name="tiny", version=0), "version"),
    ("Invalidate", pb.InvalidateRequest(model_name="tiny", version=-3), "version"),
    ("Invalidate", pb.InvalidateRequest(model_name="tiny", alias=""), "alias"),
    ("Invalidate", pb.InvalidateRequest(model_name="tiny", alias="Champion!"), "alias"),
    ("Invalidate", pb.InvalidateRequest(model_name="tiny", tenant="t" * 1000), "tenant"),
]


@pytest.mark.parametrize(
    ("rpc", "request_", "field"), BAD_OTHERS, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(BAD_OTHERS)]
)
async def test_other_bad_input_is_invalid_argument(
    cache_service: RunningCache, rpc: str, request_: object, field: str
) -> None:
    client = cache_service.client
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(client.stub, rpc)(request_)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(field)


async def test_stored_output_comes_back_whole(cache_service: RunningCache) -> None:
    client = cache_service.client
    k = key(unique_model(), sampling=sampling_pb2.SamplingParams(greedy=True, logprobs=1))
    missed = await lookup(client, k)
    assert missed.outcome == pb.CACHE_OUTCOME_MISS and missed.digest.startswith("v1:")
    assert not missed.HasField("output")
    by_digest = pb.CacheKey(model=k.model, digest=missed.digest)  # store without rehashing
    stored = await store(client, by_digest)
    assert stored.outcome == pb.STORE_OUTCOME_STORED and stored.digest == missed.digest
    assert stored.HasField("expires_at")
    hit = await lookup(client, k)
    assert hit.outcome == pb.CACHE_OUTCOME_HIT
    assert hit.output == output()  # completions, logprobs, usage: identical
    assert hit.HasField("stored_at") and hit.expires_at.seconds - hit.stored_at.seconds == 3600
    assert (await lookup(client, by_digest)).output == output()


async def test_unreproducible_requests_bypass(cache_service: RunningCache) -> None:
    client = cache_service.client
    k = key(unique_model(), sampling=sampling_pb2.SamplingParams(temperature=0.8))
    stored = await store(client, k)
    assert stored.outcome == pb.STORE_OUTCOME_SKIPPED_NONDETERMINISTIC and stored.digest == ""
    looked = await lookup(client, k)
    assert looked.outcome == pb.CACHE_OUTCOME_BYPASS and looked.digest == ""
    seeded = key(k.model.name, sampling=sampling_pb2.SamplingParams(temperature=0.8, seed=3))
    assert (await store(client, seeded)).outcome == pb.STORE_OUTCOME_STORED
    assert (await lookup(client, seeded)).outcome == pb.CACHE_OUTCOME_HIT


async def test_incomplete_and_oversized_outputs_are_not_stored(cache_service: RunningCache) -> None:
    client = cache_service.client
    k = key(unique_model())
    aborted = await store(client, k, output(reason=generation_pb2.FINISH_REASON_ABORT))
    assert aborted.outcome == pb.STORE_OUTCOME_SKIPPED_INCOMPLETE
    huge = await store(client, k, output("x" * (cache_service.settings.cache.max_entry_bytes + 1)))
    assert huge.outcome == pb.STORE_OUTCOME_SKIPPED_TOO_LARGE
    assert (await lookup(client, k)).outcome == pb.CACHE_OUTCOME_MISS


async def test_tenants_never_share_entries(cache_service: RunningCache) -> None:
    client = cache_service.client
    name = unique_model()
    await store(client, key(name, tenant="acme"), output("acme's"))
    assert (await lookup(client, key(name, tenant="globex"))).outcome == pb.CACHE_OUTCOME_MISS
    assert (await lookup(client, key(name))).outcome == pb.CACHE_OUTCOME_MISS  # nor with no tenant
    await store(client, key(name, tenant="globex"), output("globex's"))
    assert (await lookup(client, key(name, tenant="acme"))).output.completions[0].text == "acme's"
    assert (await invalidate(client, model_name=name, tenant="globex")) == 1
    assert (await lookup(client, key(name, tenant="acme"))).outcome == pb.CACHE_OUTCOME_HIT
    assert (await lookup(client, key(name, tenant="globex"))).outcome == pb.CACHE_OUTCOME_MISS


async def test_answers_follow_the_alias_when_it_moves(cache_service: RunningCache) -> None:
    """champion -> v1 is served and cached; champion moves to v2; serving now resolves it to v2."""
    client = cache_service.client
    name = unique_model()
    await store(client, key(name, 1, alias="champion"), output("v1 says"))
    assert (await lookup(client, key(name, 1, alias="champion"))).output.completions[0].text == "v1 says"
    # After the move the same client request reaches v2: v1's answer is never returned for it.
    assert (await lookup(client, key(name, 2, alias="champion"))).outcome == pb.CACHE_OUTCOME_MISS
    await store(client, key(name, 2, alias="champion"), output("v2 says"))
    assert (await lookup(client, key(name, 2, alias="champion"))).output.completions[0].text == "v2 says"
    # Serving invalidates what the alias served; v1's entries go, v2's (stored after) too.
    assert (await invalidate(client, model_name=name, alias="champion")) == 2
    assert (await lookup(client, key(name, 1, alias="champion"))).outcome == pb.CACHE_OUTCOME_MISS


async def test_invalidate_by_version_and_model(cache_service: RunningCache) -> None:
    client = cache_service.client
    name = unique_model()
    for version in (1, 2, 3):
        await store(client, key(name, version))
    assert (await invalidate(client, model_name=name, version=2)) == 1
    outcomes = [(await lookup(client, key(name, v))).outcome for v in (1, 2, 3)]
    assert outcomes == [pb.CACHE_OUTCOME_HIT, pb.CACHE_OUTCOME_MISS, pb.CACHE_OUTCOME_HIT]
    assert (await invalidate(client, model_name=name)) == 2
    outcomes = [(await lookup(client, key(name, v))).outcome for v in (1, 3)]
    assert outcomes == [pb.CACHE_OUTCOME_MISS, pb.CACHE_OUTCOME_MISS]


async def test_entries_expire_after_their_ttl(cache_service: RunningCache) -> None:
    client = cache_service.client
    k = key(unique_model())
    stored = await store(client, k, ttl=duration_pb2.Duration(nanos=300_000_000))
    assert stored.outcome == pb.STORE_OUTCOME_STORED
    assert (await lookup(client, k)).outcome == pb.CACHE_OUTCOME_HIT
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (await lookup(client, k)).outcome == pb.CACHE_OUTCOME_HIT:
        assert loop.time() < deadline, "entry outlived its TTL"
        await asyncio.sleep(0.05)
    forever = key(unique_model())
    kept = await store(client, forever, ttl=duration_pb2.Duration())
    assert kept.outcome == pb.STORE_OUTCOME_STORED and not kept.HasField("expires_at")


async def test_stats_and_metrics_count_requests(cache_service: RunningCache) -> None:
    client = cache_service.client
    before = await client.unary(client.stub.Stats, pb.StatsRequest())
    k = key(unique_model())
    await lookup(client, k)
    await store(client, k)
    await lookup(client, k)
    await lookup(client, key(k.model.name, sampling=sampling_pb2.SamplingParams()))
    after = await client.unary(client.stub.Stats, pb.StatsRequest())
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 1)
    assert (after.bypasses - before.bypasses, after.stores - before.stores) == (1, 1)
    assert after.entries >= 1 and after.bytes > 0 and 0 < after.hit_ratio < 1
    assert after.since.seconds > 0
    port = cache_service.server.metrics_http_port
    page = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    )
    assert 'llmops_cache_requests_total{result="hit"}' in page
    assert "llmops_cache_lookup_seconds_bucket" in page
    assert "llmops_cache_entries" in page and "llmops_cache_bytes" in page


def test_target_parsing() -> None:
    from llmops.cache.cli import parse_target

    assert parse_target("tiny").WhichOneof("scope") is None
    assert parse_target("tiny:3").version == 3
    assert parse_target("tiny@champion").alias == "champion"


async def test_cli_stats_and_invalidate(cache_service: RunningCache) -> None:
    client = cache_service.client
    name = unique_model()
    await store(client, key(name, 4, alias="champion"))
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke,
        cli_app,
        ["cache", "invalidate", f"{name}@champion", "--address", cache_service.address],
    )
    assert result.exit_code == 0, result.output
    assert "removed 1 entries" in result.output
    result = await asyncio.to_thread(
        runner.invoke, cli_app, ["cache", "stats", "--json", "--address", cache_service.address]
    )
    assert result.exit_code == 0, result.output
    assert int(json.loads(result.output)["invalidated"]) >= 1  # int64 is a string in proto JSON
    bad = await asyncio.to_thread(
        runner.invoke, cli_app, ["cache", "invalidate", "Bad!", "--address", cache_service.address]
    )
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output
