"""Training jobs end to end over gRPC, on Ray workers, tracked in MLflow, registered in the registry.

Invariants: a job's events arrive numbered without gaps from ``queued`` to its terminal event, with
real training numbers (loss, learning rate, tokens/s, evaluation perplexity = exp(loss)) and
checkpoints; the result is registered as a new version whose lineage names the base version, the
dataset path, revision and the commit actually read, the MLflow run and the job; the run holds the
plan, per-step metrics, the dataset and the files; the registered files load and generate.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from llmops.common.artifacts.client import download_to_directory
from llmops.proto.common.v1 import job_pb2, model_pb2
from llmops.proto.registry.v1 import registry_service_pb2 as rpb
from llmops.proto.training.v1 import training_service_pb2 as pb
from tests.integration.training.conftest import Stack, events, kinds, spec, submit

pytestmark = pytest.mark.slow


async def _version(stack: Stack, name: str, version: int) -> rpb.ModelVersion:
    client = stack.registry.client
    ref = model_pb2.ModelRef(name=name, version=version)
    found: rpb.ModelVersion = (
        await client.unary(client.stub.GetVersion, rpb.GetVersionRequest(model=ref))
    ).version
    return found


async def _download(stack: Stack, name: str, version: int, target: Path) -> Path:
    await download_to_directory(stack.registry.client, model_pb2.ModelRef(name=name, version=version), target)
    return target


def _mlflow(stack: Stack):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.registry.settings.mlflow_tracking_uri)


async def test_lora_job_trains_tracks_and_registers_an_adapter_with_lineage(
    stack: Stack, tmp_path: Path
) -> None:
    job_spec = spec(
        revision=stack.repo.first_commit[:10],
        max_steps=8,
        eval_split=0.25,
        eval_every_steps=4,
        checkpoint_every_steps=4,
        seed=7,
    )
    job_spec.aliases.append("challenger")
    job_spec.tags["team"] = "search"
    job = await submit(stack.client, job_spec, request_id="lora-once")
    assert job.state == job_pb2.JOB_STATE_QUEUED and job.spec.base_model.version == 1
    again = await submit(stack.client, job_spec, request_id="lora-once")
    assert again.id == job.id  # idempotent retry

    found = await events(stack.client, job.id)
    assert [e.sequence for e in found] == list(range(1, len(found) + 1))
    names = kinds(found)
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "finished"
    assert found[-1].state == job_pb2.JOB_STATE_SUCCEEDED
    started = found[1].started
    assert started.attempt == 1 and started.resumed_from_step == 0 and started.mlflow_run_id
    train_steps = [e.step for e in found if e.HasField("step") and e.step.phase == "train" and e.step.loss]
    assert [s.step for s in train_steps][:2] == [1, 2] and train_steps[-1].step == 8
    assert all(s.total_steps == 8 and s.learning_rate > 0 and s.tokens_per_second > 0 for s in train_steps)
    assert all(math.isfinite(s.loss) and s.loss > 0 for s in train_steps)
    evals = [e.eval for e in found if e.HasField("eval")]
    assert [e.step for e in evals] == [4, 8]
    assert all(e.perplexity == pytest.approx(math.exp(e.loss), rel=1e-6) for e in evals)
    assert [e.checkpoint.step for e in found if e.HasField("checkpoint")] == [4, 8]
    progress = [e.step.progress for e in found if e.HasField("step")]
    assert progress == sorted(progress)

    result = found[-1].finished.result
    assert result.name == "tiny-lora"
    final = (await stack.client.unary(stack.client.stub.GetJob, pb.GetJobRequest(job_id=job.id))).job
    assert final.result_version.version == result.version and final.progress == 1.0
    assert final.current_step == 8 and "eval_loss" in final.latest_metrics

    version = await _version(stack, result.name, result.version)
    assert version.format == model_pb2.MODEL_FORMAT_ADAPTER
    assert (version.adapter_base.name, version.adapter_base.version) == ("tiny", 1)
    lineage = version.lineage
    assert (lineage.parent.name, lineage.parent.version) == ("tiny", 1)
    assert (
        lineage.dataset.path == "data/sft.jsonl" and lineage.dataset.revision == stack.repo.first_commit[:10]
    )
    assert lineage.dataset_commit == stack.repo.first_commit
    assert lineage.mlflow_run_id == started.mlflow_run_id == final.mlflow_run_id
    assert lineage.job_id == job.id and lineage.job_kind == job_pb2.JOB_KIND_TRAINING
    assert "challenger" in version.aliases and version.tags["team"] == "search"
    assert version.metrics["eval_loss"] == pytest.approx(evals[-1].loss)

    mlflow = _mlflow(stack)
    run = await asyncio.to_thread(mlflow.get_run, final.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "8" and run.data.params["max_steps"] == "8"
    history = await asyncio.to_thread(mlflow.get_metric_history, final.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    (dataset_input,) = run.inputs.dataset_inputs
    source = json.loads(dataset_input.dataset.source)
    assert source["commit"] == stack.repo.first_commit and dataset_input.dataset.source_type == "dvc"
    artifacts = await asyncio.to_thread(mlflow.list_artifacts, final.mlflow_run_id, "model")
    assert "model/adapter_config.json" in {a.path for a in artifacts}

    # The revision was honoured: the job trained on the 24-row first version, not HEAD's 32 rows.
    snapshot = stack.data_dir / "training" / "jobs" / job.id / "dataset.jsonl"
    assert len(snapshot.read_text().splitlines()) == 24

    # What was registered loads with PEFT on its base and generates.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = await _download(stack, "tiny", 1, tmp_path / "base")
    adapter_dir = await _download(stack, result.name, result.version, tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    out = model.generate(
        **tokenizer("def add_3(x):\n", return_tensors="pt"), max_new_tokens=4, do_sample=False
    )
    assert out.shape[-1] > 4


async def test_sft_on_chat_data_registers_full_weights(stack: Stack, tmp_path: Path) -> None:
    job_spec = spec("data/chat.jsonl", method=pb.TRAINING_METHOD_SFT, lora=False, max_steps=3)
    job_spec.output_model_name = "tiny-chat"
    job = await submit(stack.client, job_spec)
    found = await events(stack.client, job.id)
    assert found[-1].state == job_pb2.JOB_STATE_SUCCEEDED, found[-1]
    assert job.spec.dataset.format == pb.DATASET_FORMAT_CHAT  # inferred from the rows
    result = found[-1].finished.result
    version = await _version(stack, "tiny-chat", result.version)
    assert version.format == model_pb2.MODEL_FORMAT_FP32 and not version.adapter_base.name
    assert version.lineage.dataset_commit == stack.repo.head_commit  # workspace read at HEAD

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        await _download(stack, "tiny-chat", result.version, tmp_path / "m")
    )
    assert sum(p.numel() for p in model.parameters()) > 10_000_000


async def test_dpo_with_lora_on_preference_pairs(stack: Stack) -> None:
    job = await submit(
        stack.client, spec("data/prefs.jsonl", method=pb.TRAINING_METHOD_DPO, max_steps=3, dpo_beta=0.2)
    )
    found = await events(stack.client, job.id)
    assert found[-1].state == job_pb2.JOB_STATE_SUCCEEDED, found[-1]
    steps = [e.step for e in found if e.HasField("step") and e.step.loss]
    assert steps and all(math.isfinite(s.loss) for s in steps)
    assert any(key.startswith("rewards") for s in steps for key in s.metrics)
    assert found[-1].finished.result.name == "tiny-dpo"
    version = await _version(stack, "tiny-dpo", found[-1].finished.result.version)
    assert version.format == model_pb2.MODEL_FORMAT_ADAPTER


async def test_an_alias_base_is_resolved_and_merge_registers_full_weights(stack: Stack) -> None:
    job_spec = spec(base=model_pb2.ModelRef(name="tiny", alias="champion"), max_steps=2)
    job_spec.lora.merge_adapter = True
    job_spec.output_model_name = "tiny-merged"
    job = await submit(stack.client, job_spec)
    assert job.spec.base_model.version == 1 and not job.spec.base_model.alias
    found = await events(stack.client, job.id)
    assert found[-1].state == job_pb2.JOB_STATE_SUCCEEDED, found[-1]
    version = await _version(stack, "tiny-merged", found[-1].finished.result.version)
    assert version.format == model_pb2.MODEL_FORMAT_FP32


async def test_metrics_endpoint_counts_jobs_by_state_and_result(stack: Stack) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    port = stack.training.server.metrics_http_port
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    listed = await stack.client.unary(stack.client.stub.ListJobs, pb.ListJobsRequest(page_size=1000))
    succeeded = [j for j in listed.jobs if j.state == job_pb2.JOB_STATE_SUCCEEDED]
    assert succeeded  # the tests above ran jobs on this stack
    assert samples[("llmops_training_jobs", (("state", "succeeded"),))] == len(succeeded)
    lora = sum(1 for j in succeeded if j.spec.method == pb.TRAINING_METHOD_LORA)
    key = ("llmops_training_jobs_finished_total", (("method", "lora"), ("result", "succeeded")))
    assert samples[key] == lora
    assert ("llmops_training_tokens_per_second", (("method", "sft"),)) in samples
