"""Bad input to the training service gets the documented status, with a message naming the problem,
before any compute is spent: no job is created for a refused submission.

A table per RPC of (what is wrong, expected code, words the message must contain), against the real
server of the package's stack (interceptors included).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from llmops.common.errors import LLMOpsError
from llmops.proto.common.v1 import compute_pb2, model_pb2
from llmops.proto.training.v1 import training_service_pb2 as pb
from tests.integration.training.conftest import Stack, events, spec, submit

pytestmark = pytest.mark.slow
INVALID, NOT_FOUND, PRECONDITION = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def _with(change: Callable[[pb.TrainingJobSpec], object], **kwargs: object) -> pb.TrainingJobSpec:
    message = spec(**kwargs)  # type: ignore[arg-type]
    change(message)
    return message


def _lora_r(m: pb.TrainingJobSpec) -> None:
    m.lora.r = 5000


SUBMIT_CASES: list[tuple[str, pb.TrainingJobSpec, grpc.StatusCode, str]] = [
    ("unknown base", spec(base=model_pb2.ModelRef(name="nope", version=1)), NOT_FOUND, "nope"),
    ("unknown base version", spec(base=model_pb2.ModelRef(name="tiny", version=99)), NOT_FOUND, "99"),
    ("unknown alias", spec(base=model_pb2.ModelRef(name="tiny", alias="gone")), NOT_FOUND, "gone"),
    ("no base name", spec(base=model_pb2.ModelRef()), INVALID, "spec.base_model"),
    ("unknown dataset", spec("data/missing.jsonl"), NOT_FOUND, "data/missing.jsonl"),
    ("unknown revision", spec(revision="no-such-branch"), NOT_FOUND, "no-such-branch"),
    ("path escapes the repo", spec("../secrets.jsonl"), INVALID, "spec.dataset.ref.path"),
    ("dataset name too long", spec("data/" + "d" * 300), INVALID, "spec.dataset.ref.path"),
    ("dataset file URI too long", spec("file:///tmp/" + "d" * 300), INVALID, "spec.dataset.ref.path"),
    ("dataset through a file", spec("data/sft.jsonl/x.jsonl"), NOT_FOUND, "data/sft.jsonl/x.jsonl"),
    # read from Git's tree, where no such name exists
    (
        "dataset name too long at a revision",
        spec("data/" + "d" * 300, revision="HEAD"),
        NOT_FOUND,
        "not exist",
    ),
    ("malformed row", spec("data/bad.jsonl"), INVALID, "line 3"),
    ("s3 dataset", spec("s3://bucket/x.jsonl"), INVALID, "s3://"),
    ("no method", spec(method=pb.TRAINING_METHOD_UNSPECIFIED), INVALID, "spec.method"),
    ("lora without config", spec(lora=False), INVALID, "spec.lora"),
    ("sft with lora", spec(method=pb.TRAINING_METHOD_SFT), INVALID, "spec.lora"),
    ("dpo on sft rows", spec(method=pb.TRAINING_METHOD_DPO), INVALID, "preference"),
    ("sft on preference rows", spec("data/prefs.jsonl"), INVALID, "preference"),
    ("negative learning rate", spec(learning_rate=-1.0), INVALID, "learning_rate"),
    ("eval split too big", spec(eval_split=0.9), INVALID, "eval_split"),
    ("zero epochs", spec(max_steps=None, num_epochs=-1.0), INVALID, "num_epochs"),
    ("warmup ratio 1", spec(warmup_ratio=1.0), INVALID, "warmup_ratio"),
    ("longer than the model", spec(max_seq_length=1 << 16), INVALID, "max_seq_length"),
    ("dpo beta on lora", spec(dpo_beta=0.5), INVALID, "dpo_beta"),
    ("lora rank", _with(_lora_r), INVALID, "spec.lora.r"),
    ("too many workers", _with(lambda m: setattr(m, "num_workers", 600)), INVALID, "num_workers"),
    (
        "bad output name",
        _with(lambda m: setattr(m, "output_model_name", "Bad Name")),
        INVALID,
        "output_model_name",
    ),
    ("bad alias", _with(lambda m: m.aliases.append("no spaces")), INVALID, "spec.aliases"),
    ("qlora on a CPU", spec(method=pb.TRAINING_METHOD_QLORA), PRECONDITION, "CUDA"),
    ("fp16 on a CPU", spec(precision=compute_pb2.PRECISION_FP16), PRECONDITION, "FP16"),
    ("dpo on chat rows", spec("data/chat.jsonl", lora=False, method=pb.TRAINING_METHOD_DPO), INVALID, "chat"),
]


async def _count(stack: Stack) -> int:
    listed = await stack.client.unary(stack.client.stub.ListJobs, pb.ListJobsRequest(page_size=1000))
    return len(listed.jobs)


@pytest.mark.parametrize(
    ("case", "job_spec", "code", "words"), SUBMIT_CASES, ids=[c[0] for c in SUBMIT_CASES]
)
async def test_submit_refuses_bad_specs_before_any_compute(
    stack: Stack, case: str, job_spec: pb.TrainingJobSpec, code: grpc.StatusCode, words: str
) -> None:
    before = await _count(stack)
    with pytest.raises(LLMOpsError) as info:
        await submit(stack.client, job_spec)
    assert info.value.code == code, info.value.message
    assert words in info.value.message
    assert await _count(stack) == before


async def test_other_rpcs_map_bad_input_to_their_codes(stack: Stack) -> None:
    client = stack.client
    cases: list[tuple[object, object, grpc.StatusCode]] = [
        (client.stub.GetJob, pb.GetJobRequest(job_id="tj-none"), NOT_FOUND),
        (client.stub.CancelJob, pb.CancelJobRequest(job_id="tj-none"), NOT_FOUND),
        (client.stub.ListJobs, pb.ListJobsRequest(page_size=5000), INVALID),
        (client.stub.ListJobs, pb.ListJobsRequest(page_token="x"), INVALID),
        (client.stub.SubmitJob, pb.SubmitJobRequest(), INVALID),
        (client.stub.SubmitJob, pb.SubmitJobRequest(spec=spec(), request_id="r" * 200), INVALID),
    ]
    for method, request, code in cases:
        with pytest.raises(LLMOpsError) as info:
            await client.unary(method, request)  # type: ignore[arg-type]
        assert info.value.code == code, (request, info.value.message)
    for job_id, sequence, code in (("tj-none", 0, NOT_FOUND), ("tj-none", -1, INVALID)):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await events_of(stack, job_id, sequence)
        assert raised.value.code() == code

    done = await submit(client, spec(max_steps=1))
    assert (await events(client, done.id))[-1].HasField("finished")
    with pytest.raises(LLMOpsError) as info:
        await client.unary(client.stub.CancelJob, pb.CancelJobRequest(job_id=done.id))
    assert info.value.code == PRECONDITION and "succeeded" in info.value.message


async def events_of(stack: Stack, job_id: str, sequence: int) -> list[object]:
    request = pb.WatchJobRequest(job_id=job_id, from_sequence=sequence)
    return [r async for r in stack.client.stub.WatchJob(request, timeout=30)]
