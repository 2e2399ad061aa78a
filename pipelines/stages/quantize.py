"""Quantize: the fine-tuned version to INT8 (weight-only, per channel) through the quantization service.

The result is registered as the next version of the served model (its lineage: parent = the
fine-tuned version), with the measured size ratio and perplexity change in its metrics. The job
measures perplexity before and after on the pipeline's eval split (``data/prepared/eval.txt``: the
eval rows' prompts and completions as text), not on the service's default text. Writes
``reports/quantize.json``.

    python -m stages.quantize [--params params.yaml]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .common import load_params, parser, pipeline_path
from .services import read_json, ref, report, run_job, stack


def main(argv: Sequence[str] | None = None) -> int:
    from llmops.common.clients import QuantizationClient
    from llmops.proto.common.v1 import dataset_pb2
    from llmops.proto.quantization.v1 import quantization_service_pb2 as pb
    from llmops.quantization.cli import follow_job

    args = parser(__doc__).parse_args(argv)
    params: dict[str, Any] = load_params(args.params)["quantize"]
    record = stack()
    candidate = read_json(pipeline_path("reports/train.json"))["version"]
    spec = pb.QuantizationJobSpec(
        source=ref(candidate["name"], version=int(candidate["version"])),
        method=pb.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY,
        eval=pb.QuantizationEval(
            dataset=pb.DatasetSample(
                # the services of the embedded stack share this machine's file system
                ref=dataset_pb2.DatasetRef(path=str(pipeline_path("data/prepared/eval.txt").absolute())),
                num_samples=int(params["eval_samples"]),
                seq_len=int(params["seq_len"]),
            ),
            measure_throughput=True,
            throughput_tokens=int(params["throughput_tokens"]),
        ),
        output_model_name=record["model"],
        description=f"{candidate['name']}:{candidate['version']} as INT8 weight-only",
    )
    spec.tags["pipeline"] = "demo"

    job = run_job("quantize", QuantizationClient, "quantization", pb.SubmitJobRequest(spec=spec), follow_job)
    if job is None:
        return 1
    result = job.result
    report(
        "quantize",
        {
            "job_id": job.id,
            "eval_text": job.spec.eval.dataset.ref.path,  # as the service recorded it
            "version": {"name": result.result_version.name, "version": result.result_version.version},
            "size_ratio": result.size_ratio,
            "perplexity_before": result.perplexity_before,
            "perplexity_after": result.perplexity_after,
            "tokens_per_second_before": result.tokens_per_second_before,
            "tokens_per_second_after": result.tokens_per_second_after,
        },
    )
    print(
        f"quantize: registered {result.result_version.name}:{result.result_version.version}, "
        f"size x{result.size_ratio:.3f}, perplexity {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
