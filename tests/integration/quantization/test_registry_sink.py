"""The quantization service wired to a real registry (``quantization.use_registry``): the source is
read from the registry and the result is registered there as a child version.

A registry server (MLflow on SQLite in the test's temporary folder) holds the tiny model as
``tiny`` version 1; the quantization service, started the way ``llmops serve quantization`` starts
it, runs an INT8 job on ``tiny:1``: weight-only (torchao, through ``save_pretrained``) and dynamic
(``torch.ao``, written as int8 safetensors with per-channel scales and our own
``quantization_config``); both outputs pass the registry's validation (no pickle).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llmops.common.app import start_app
from llmops.common.artifacts.client import upload_directory
from llmops.common.clients import QuantizationClient
from llmops.common.settings import Settings
from llmops.common.tiny_model import build_tiny_model
from llmops.proto.common.v1 import dataset_pb2, job_pb2, model_pb2
from llmops.proto.quantization.v1 import quantization_service_pb2 as qpb
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.quantization.app import build_app
from tests.integration.registry.conftest import RunningRegistry, start_registry, stop_registry

pytestmark = pytest.mark.slow

METRICS = (
    "size_ratio",
    "perplexity_before",
    "perplexity_after",
    "tokens_per_second_before",
    "tokens_per_second_after",
)


@pytest_asyncio.fixture(loop_scope="session")
async def registry(tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    running = await start_registry(tmp_path / "registry", tmp_path)
    yield running
    await stop_registry(running)


@pytest.mark.parametrize(
    "method", [qpb.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY, qpb.QUANTIZATION_METHOD_INT8_DYNAMIC]
)
async def test_job_reads_from_and_registers_child_version_in_registry(
    method: qpb.QuantizationMethod.ValueType, registry: RunningRegistry, tmp_path: Path
) -> None:
    method_name = qpb.QuantizationMethod.Name(method).removeprefix("QUANTIZATION_METHOD_").lower()
    tiny = await upload_directory(
        registry.client,
        rpb.VersionMetadata(model_name="tiny", create_model=True, format=model_pb2.MODEL_FORMAT_FP32),
        build_tiny_model().path,
    )
    assert (tiny.name, tiny.version) == ("tiny", 1)

    endpoint = {"port": 0, "metrics_port": 0}
    settings = Settings.model_validate(
        {
            "data_dir": str(tmp_path / "quantization"),
            "health_poll_seconds": 0.05,
            "grace_seconds": 1.0,
            "registry": {**endpoint, "address": registry.address},
            "quantization": {**endpoint, "address": "127.0.0.1:0", "use_registry": True, "runner": "thread"},
            # jobs are tracked in the registry's MLflow store (one store for the platform)
            "mlflow_tracking_uri": registry.settings.mlflow_tracking_uri,
        }
    )
    server, app = await start_app(build_app, settings, host="127.0.0.1", port=0, metrics_port=0)
    client = QuantizationClient.connect(f"127.0.0.1:{server.port}", timeout=60)
    try:
        await client.wait_ready(timeout=20, interval=0.02)
        spec = qpb.QuantizationJobSpec(
            source=model_pb2.ModelRef(name="tiny", version=1),
            method=method,
            eval=qpb.QuantizationEval(
                dataset=qpb.DatasetSample(ref=dataset_pb2.DatasetRef(), num_samples=2, seq_len=64),
                measure_throughput=True,
                throughput_tokens=8,
            ),
        )
        job = (await client.unary(client.stub.SubmitJob, qpb.SubmitJobRequest(spec=spec))).job
        events = [
            r.event async for r in client.stub.WatchJob(qpb.WatchJobRequest(job_id=job.id), timeout=120)
        ]
        assert events[-1].WhichOneof("payload") == "finished", events[-1]
        assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED
        done = (await client.unary(client.stub.GetJob, qpb.GetJobRequest(job_id=job.id))).job
        result, job_run_id = done.result, done.mlflow_run_id
    finally:
        await client.close()
        await server.stop(0)
        await app.close()

    cached = tmp_path / "quantization" / "quantization" / "sources" / "tiny" / "1"
    assert (cached / "config.json").is_file()  # the source came from the registry, not models_dir
    child_ref = model_pb2.ModelRef(name=result.result_version.name, version=result.result_version.version)
    assert (child_ref.name, child_ref.version) == (f"tiny-{method_name.replace('_', '-')}", 1)
    rc = registry.client
    child = (await rc.unary(rc.stub.GetVersion, rpb.GetVersionRequest(model=child_ref))).version
    assert child.status == rpb.VERSION_STATUS_READY
    assert child.format == model_pb2.MODEL_FORMAT_INT8
    assert (child.lineage.parent.name, child.lineage.parent.version) == ("tiny", 1)
    assert child.lineage.job_id == job.id
    assert child.lineage.mlflow_run_id and child.lineage.mlflow_run_id == job_run_id
    assert child.lineage.job_kind == job_pb2.JOB_KIND_QUANTIZATION
    assert child.tags["quantization_method"] == method_name
    measured = {
        "size_ratio": result.size_ratio,
        "perplexity_before": result.perplexity_before,
        "perplexity_after": result.perplexity_after,
        "tokens_per_second_before": result.tokens_per_second_before,
        "tokens_per_second_after": result.tokens_per_second_after,
    }
    assert {k: child.metrics[k] for k in METRICS} == pytest.approx(measured)
    assert 0 < child.metrics["size_ratio"] < 0.5
    assert child.metrics["perplexity_before"] > 1 and child.metrics["tokens_per_second_after"] > 0

    lineage = (await rc.unary(rc.stub.GetLineage, rpb.GetLineageRequest(model=child_ref))).versions
    assert [(v.name, v.version) for v in lineage] == [(child_ref.name, 1), ("tiny", 1)]
