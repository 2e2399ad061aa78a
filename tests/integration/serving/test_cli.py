"""``llmops generate`` and ``llmops serving models|load|unload`` as real processes against a real server.

Invariants: the commands reach the server through the gRPC API; a streamed generation prints the
same text as a whole one; load, list and unload change and show the model table; errors exit non-zero
with the status name.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tests.integration.serving.conftest import serving_settings, start_stack, stop_stack
from tests.integration.serving.test_grpc_load import Fakes


async def llmops(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "llmops.cli", *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)


async def test_cli_load_generate_list_unload(tiny_model_path: Path) -> None:
    stack = await start_stack(Fakes(), serving_settings(LLMOPS_SERVING_HTTP_ENABLED="false"))
    address = f"127.0.0.1:{stack.port}"
    try:
        loaded = await llmops("serving", "load", str(tiny_model_path), "--name", "fake", "--address", address)
        assert loaded.returncode == 0, loaded.stderr
        assert "fake: ready" in loaded.stdout
        listed = await llmops("serving", "models", "--address", address)
        assert "fake" in listed.stdout and "ready" in listed.stdout
        args = (
            "generate",
            "def f(x):",
            "--max-tokens",
            "12",
            "--greedy",
            "--ignore-eos",
            "--address",
            address,
        )
        streamed, whole = await asyncio.gather(llmops(*args), llmops(*args, "--no-stream"))
        assert streamed.returncode == whole.returncode == 0, streamed.stderr + whole.stderr
        assert streamed.stdout.strip() and streamed.stdout.strip() == whole.stdout.strip()
        assert "12 generated tokens" in streamed.stderr
        bad = await llmops("generate", "x", "--top-p", "2", "--address", address)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "sampling.top_p" in bad.stderr
        unloaded = await llmops("serving", "unload", "fake", "--drain", "0", "--address", address)
        assert unloaded.returncode == 0 and "unloaded fake" in unloaded.stdout
        missing = await llmops("serving", "unload", "fake", "--address", address)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    finally:
        await stop_stack(stack)
