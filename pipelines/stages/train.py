"""Train: fine-tune the stack's base version on ``data/prepared/sft.jsonl`` through the training service.

LoRA SFT (loss on the completion), the adapter merged into full weights so the quantize stage can take
it; the job is followed with a live progress bar. The dataset is named by its path in this data
repository, so the job's lineage records the commit that holds the bytes (when ``dvc.lock`` at HEAD
does). Writes ``reports/train.json``: job id, registered version, MLflow run, final metrics.

    python -m stages.train [--params params.yaml]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .common import load_params, parser
from .services import ref, report, run_job, stack


def main(argv: Sequence[str] | None = None) -> int:
    from llmops.common.clients import TrainingClient
    from llmops.proto.common.v1 import dataset_pb2
    from llmops.proto.training.v1 import training_service_pb2 as pb
    from llmops.training.cli import follow_job

    args = parser(__doc__).parse_args(argv)
    params: dict[str, Any] = load_params(args.params)["train"]
    record = stack()
    base = record["base"]
    spec = pb.TrainingJobSpec(
        base_model=ref(base["name"], version=int(base["version"])),
        dataset=pb.TrainingDataset(ref=dataset_pb2.DatasetRef(path="data/prepared/sft.jsonl")),
        method=pb.TRAINING_METHOD_LORA,
        hyperparameters=pb.Hyperparameters(
            max_steps=int(params["max_steps"]),
            per_device_batch_size=int(params["batch_size"]),
            learning_rate=float(params["learning_rate"]),
            max_seq_length=int(params["max_seq_length"]),
            warmup_ratio=float(params["warmup_ratio"]),
            eval_split=float(params["eval_split"]),
            eval_every_steps=int(params["eval_every_steps"]),
            checkpoint_every_steps=int(params["checkpoint_every_steps"]),
            logging_every_steps=int(params["logging_every_steps"]),
            seed=int(params["seed"]),
        ),
        lora=pb.LoraConfig(r=int(params["lora_r"]), alpha=int(params["lora_alpha"]), merge_adapter=True),
        output_model_name=record["model"],  # a version of the served model: it may become the champion
        description=f"{base['name']}:{base['version']} + LoRA SFT on the pipeline's instructions",
    )
    spec.tags["pipeline"] = "demo"

    job = run_job("train", TrainingClient, "training", pb.SubmitJobRequest(spec=spec), follow_job)
    if job is None:
        return 1
    report(
        "train",
        {
            "job_id": job.id,
            "version": {"name": job.result_version.name, "version": job.result_version.version},
            "mlflow_run_id": job.mlflow_run_id,
            "steps": job.current_step,
            "metrics": dict(sorted(job.latest_metrics.items())),
        },
    )
    print(f"train: registered {job.result_version.name}:{job.result_version.version} (job {job.id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
