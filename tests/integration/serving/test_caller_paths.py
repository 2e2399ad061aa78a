"""Serving's LoadModel and LoadAdapter on a real gRPC server (127.0.0.1 port 0) with local paths the
file system refuses.

Invariant: a ``local_path`` that cannot name a folder on this server (longer than the file system
allows, a symlink loop, through a file, missing, ``~user`` of no user, a NUL byte) is answered with
a caller error (INVALID_ARGUMENT or NOT_FOUND, with a message), never INTERNAL; nothing is loaded,
and the server still loads a good folder afterwards. A randomized fuzz run found LoadModel
answering INTERNAL to a path longer than the file system allows (``OSError: [Errno 36]``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from llmops.common.errors import LLMOpsError
from llmops.proto.serving.v1 import serving_service_pb2 as pb
from llmops.serving.domain import EngineKind, EngineOptions
from llmops.serving.engines.fake import FakeEngine
from tests.integration.serving.conftest import Stack, start_stack, stop_stack
from tests.registry_support import write_adapter, write_llama

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _fake(kind: EngineKind, path: Path, name: str, options: EngineOptions) -> FakeEngine:
    return FakeEngine(path, name, options)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack() -> AsyncIterator[Stack]:
    s = await start_stack(_fake)
    yield s
    await stop_stack(s)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caller-paths")
    (root / "loop").symlink_to(root / "loop")
    (root / "file").write_text("x")
    return {"root": root, "model": write_llama(root / "model"), "adapter": write_adapter(root / "adapter")}


def _cases(root: Path) -> list[tuple[str, str, grpc.StatusCode]]:
    name_max = os.pathconf(root, "PC_NAME_MAX")
    return [
        ("a part longer than NAME_MAX", str(root / ("a" * (name_max + 1))), INVALID),
        ("a path longer than PATH_MAX", "/" + "/".join(["b" * 200] * 30), INVALID),
        ("a relative part too long", "c" * 4096, INVALID),
        ("a symlink loop", str(root / "loop" / "m"), NOT_FOUND),  # Path.is_dir: False on ELOOP
        ("through a file", str(root / "file" / "m"), NOT_FOUND),
        ("missing", str(root / "missing"), NOT_FOUND),
        ("no such user", "~no-such-user-llmops/m", INVALID),
        ("a NUL byte", str(root) + "/m\x00x", NOT_FOUND),  # Path.is_dir answers False for it
    ]


CASE_IDS = [c[0] for c in _cases(Path("/tmp"))]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
async def test_load_model_answers_a_caller_error(stack: Stack, paths: dict[str, Path], index: int) -> None:
    _, path, code = _cases(paths["root"])[index]
    request = pb.LoadModelRequest(local_path=path, served_name="bad-path", engine=pb.ENGINE_TRANSFORMERS)
    with pytest.raises(LLMOpsError) as caught:
        await stack.client.unary(stack.client.stub.LoadModel, request)
    assert caught.value.code == code, caught.value.message
    assert "internal error" not in caught.value.message
    listed = await stack.client.unary(stack.client.stub.ListModels, pb.ListModelsRequest())
    assert "bad-path" not in [m.served_name for m in listed.models]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
async def test_load_adapter_answers_a_caller_error(stack: Stack, paths: dict[str, Path], index: int) -> None:
    _, path, code = _cases(paths["root"])[index]
    base = pb.LoadModelRequest(
        local_path=str(paths["model"]), served_name="base", engine=pb.ENGINE_TRANSFORMERS, replace=True
    )
    await stack.client.unary(stack.client.stub.LoadModel, base)
    request = pb.LoadAdapterRequest(
        base=pb.ModelSelector(served_name="base"), local_path=path, adapter_name="bad-path"
    )
    with pytest.raises(LLMOpsError) as caught:
        await stack.client.unary(stack.client.stub.LoadAdapter, request)
    assert caught.value.code == code, caught.value.message
    assert "internal error" not in caught.value.message


async def test_a_good_folder_still_loads(stack: Stack, paths: dict[str, Path]) -> None:
    request = pb.LoadModelRequest(
        local_path=str(paths["model"]), served_name="good", engine=pb.ENGINE_TRANSFORMERS
    )
    await stack.client.unary(stack.client.stub.LoadModel, request)
    adapter = pb.LoadAdapterRequest(
        base=pb.ModelSelector(served_name="good"), local_path=str(paths["adapter"]), adapter_name="lora"
    )
    await stack.client.unary(stack.client.stub.LoadAdapter, adapter)
    listed = await stack.client.unary(stack.client.stub.ListModels, pb.ListModelsRequest())
    assert "good" in [m.served_name for m in listed.models]
