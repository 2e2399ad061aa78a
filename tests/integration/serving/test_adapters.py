"""LoRA adapters on the transformers engine, through the gRPC and HTTP APIs.

Invariants: LoadAdapter adds a PEFT adapter to a loaded base; a request naming it is generated with
it (its output differs from the base model's), a request without it is not affected; the adapter
shows in ListModels and in /v1/models and can be picked by name over HTTP; UnloadAdapter removes it
and later requests for it are NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from llmops.common.errors import NotFound
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.app import default_engine_factory
from tests.integration.serving.conftest import Stack, start_stack, stop_stack


@pytest.fixture(scope="module")
def adapter_path(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_path))
    # Random B matrices (not PEFT's zero init), so the adapter visibly changes the output.
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    folder = tmp_path_factory.mktemp("adapter") / "sql"
    get_peft_model(base, config).save_pretrained(str(folder))
    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def own_stack(tiny_model_path: Path) -> AsyncIterator[Stack]:
    """A fresh transformers engine: loading adapters changes the model, so the shared one stays clean."""
    stack = await start_stack(default_engine_factory)
    request = pb.LoadModelRequest(
        local_path=str(tiny_model_path), served_name="base", engine=pb.ENGINE_TRANSFORMERS
    )
    await stack.client.unary(stack.client.stub.LoadModel, request)
    yield stack
    await stop_stack(stack)


async def test_adapter_lifecycle(own_stack: Stack, adapter_path: Path) -> None:
    client = own_stack.client
    args = {"max_tokens": 16, "greedy": True, "ignore_eos": True}
    before = await client.generate_text("base", "SELECT", **args)
    loaded = await client.unary(
        client.stub.LoadAdapter,
        pb.LoadAdapterRequest(base=pb.ModelSelector(served_name="base"), local_path=str(adapter_path)),
    )
    assert loaded.adapter.name == "sql" and loaded.adapter.rank == 8
    listed = await client.unary(client.stub.ListModels, pb.ListModelsRequest())
    assert [a.name for a in listed.models[0].adapters] == ["sql"]

    request = pb.GenerateRequest(
        model=pb.ModelSelector(served_name="base"),
        adapter="sql",
        prompt={"text": "SELECT"},  # type: ignore[arg-type]
        sampling=args,  # type: ignore[arg-type]
    )
    with_adapter = (await client.unary(client.stub.Generate, request)).output.completions[0].text
    assert with_adapter != before
    assert await client.generate_text("base", "SELECT", **args) == before  # the base alone is unchanged

    http = openai.AsyncOpenAI(base_url=own_stack.http_url + "/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in (await http.models.list()).data}
    assert set(models) == {"base", "sql"}
    over_http = await http.completions.create(
        model="sql", prompt="SELECT", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert over_http.choices[0].text == with_adapter

    await client.unary(
        client.stub.UnloadAdapter,
        pb.UnloadAdapterRequest(base=pb.ModelSelector(served_name="base"), adapter_name="sql"),
    )
    with pytest.raises(NotFound):
        await client.unary(client.stub.Generate, request)
    assert await client.generate_text("base", "SELECT", **args) == before
