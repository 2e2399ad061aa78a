"""What the service stages share: settings, gRPC clients, the stack record, and reports.

The service stages are thin: each makes a few calls to the platform's services (addresses from the
``LLMOPS_*_ADDRESS`` settings, which ``llmops demo`` sets for the stack it started) and writes what
came back to ``reports/<stage>.json``. ``reports/stack.json`` (written by whoever starts the stack)
names the stack and the base version; every service stage depends on it, so a new stack re-runs
them while the data stages stay cached.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from .common import pipeline_path, write_json

T = TypeVar("T")
#: Watches of one job before a stage gives up (a long quiet stream can be dropped, e.g. by the
#: server's HTTP/2 ping policy on a busy machine; the job itself runs on).
WATCH_ATTEMPTS = 5
STACK_FILE = pipeline_path("reports/stack.json")


def settings() -> Any:
    from llmops.common.settings import Settings

    return Settings.load()


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def stack() -> dict[str, Any]:
    """The stack record: ``base`` ({name, version}), ``model`` (the served model's name)."""
    return read_json(STACK_FILE)


def report(name: str, data: dict[str, Any]) -> Path:
    path = pipeline_path(f"reports/{name}.json")
    write_json(path, data)
    return path


def call(
    client_type: Any, service: str, work: Callable[[Any], Awaitable[T]], *, timeout: float | None = 120.0
) -> T:
    """Connect to ``service`` and run ``work(client)``; errors surface as the domain exception."""

    async def main() -> T:
        address = settings().section(service).address
        async with client_type.connect(address, timeout=timeout) as client:
            return await work(client)

    return asyncio.run(main())


def ref(name: str, version: int | None = None, alias: str | None = None) -> Any:
    from llmops.proto.common.v1 import model_pb2

    message = model_pb2.ModelRef(name=name)
    if version is not None:
        message.version = version
    elif alias:
        message.alias = alias
    return message


def resolve_alias(name: str, alias: str) -> int | None:
    """The version ``name@alias`` points at, or None."""
    from llmops.common.clients import RegistryClient
    from llmops.common.errors import NotFound
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb

    async def work(client: Any) -> int | None:
        try:
            found = await client.unary(
                client.stub.GetVersion, rpb.GetVersionRequest(model=ref(name, alias=alias))
            )
        except NotFound:
            return None
        return int(found.version.version)

    return call(RegistryClient, "registry", work)


def download(name: str, version: int) -> Path:
    """A registry version's folder, downloaded and verified once into the data folder's cache."""
    from llmops.common.artifacts.sources import RegistryModelSource

    config = settings()
    source = RegistryModelSource(config.registry.address, config.data_dir.absolute() / "pipeline" / "models")
    return Path(source.resolve(name, version).path)


def run_job(stage: str, client_type: Any, service: str, request: Any, follow: Any) -> Any | None:
    """Submit a job (``SubmitJobRequest``) and follow it with its progress bar; the finished job, or
    None (with the reason on stderr) unless it succeeded."""
    import sys

    from llmops.common.errors import Unavailable
    from llmops.proto.common.v1 import job_pb2

    async def work(client: Any) -> Any:
        submitted = await client.unary(client.stub.SubmitJob, request)
        for _ in range(WATCH_ATTEMPTS - 1):
            try:
                return await follow(client, submitted.job.id)
            except Unavailable as exc:  # the job runs on: a broken watch is not a failed job
                print(
                    f"{stage}: the watch of {submitted.job.id} broke ({exc}); watching again", file=sys.stderr
                )
        return await follow(client, submitted.job.id)

    job = call(client_type, service, work, timeout=None)
    if job.state != job_pb2.JOB_STATE_SUCCEEDED:
        print(
            f"{stage}: job {job.id} ended {job_pb2.JobState.Name(job.state)}: {job.error_message}",
            file=sys.stderr,
        )
        return None
    return job


#: ``quantization_config.quant_method`` values vLLM loads (its GPTQ and AWQ loaders read our W4A16
#: layouts); a folder without one is full precision, which vLLM loads too.
VLLM_QUANT_METHODS = frozenset({"gptq", "awq"})


def serving_engine(folder: Path) -> str:
    """The engine that serves the model in ``folder``: ``vllm`` for full precision and the quantized
    layouts vLLM loads, ``transformers`` for the rest (our INT8 / INT4 formats, torchao INT8)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    settings = config.get("quantization_config")
    method = settings.get("quant_method") if isinstance(settings, dict) else None
    return "vllm" if method is None or method in VLLM_QUANT_METHODS else "transformers"


def version_format(name: str, version: int) -> str:
    """The registry's format of ``name:version`` (``fp32``, ``int8``, ...)."""
    from llmops.common.clients import RegistryClient
    from llmops.proto.common.v1 import model_pb2
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb

    async def work(client: Any) -> str:
        found = await client.unary(
            client.stub.GetVersion, rpb.GetVersionRequest(model=ref(name, version=version))
        )
        return str(model_pb2.ModelFormat.Name(found.version.format).removeprefix("MODEL_FORMAT_").lower())

    return call(RegistryClient, "registry", work)
