"""Register: point the ``challenger`` alias at the quantized version and record its lineage chain.

Training and quantization registered their results already; this stage names the candidate
(``<model>@challenger``) and writes ``reports/register.json`` with the chain from it to the root:
each version's format, parent, dataset (path, revision, commit), MLflow run and job.

    python -m stages.register [--params params.yaml]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .common import parser, pipeline_path
from .services import call, read_json, ref, report


def main(argv: Sequence[str] | None = None) -> int:
    from llmops.common.clients import RegistryClient
    from llmops.proto.common.v1 import job_pb2, model_pb2
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb

    parser(__doc__).parse_args(argv)
    quantized = read_json(pipeline_path("reports/quantize.json"))["version"]
    name, version = quantized["name"], int(quantized["version"])

    async def work(client: Any) -> Any:
        await client.unary(
            client.stub.SetAlias,
            rpb.SetAliasRequest(
                model_name=name, alias="challenger", version=version, reason="pipeline candidate"
            ),
        )
        return await client.unary(
            client.stub.GetLineage, rpb.GetLineageRequest(model=ref(name, version=version))
        )

    lineage = call(RegistryClient, "registry", work)
    chain = [
        {
            "version": f"{v.name}:{v.version}",
            "format": model_pb2.ModelFormat.Name(v.format).removeprefix("MODEL_FORMAT_").lower(),
            "parent": f"{v.lineage.parent.name}:{v.lineage.parent.version}" if v.lineage.parent.name else "",
            "dataset": v.lineage.dataset.path,
            "dataset_revision": v.lineage.dataset.revision,
            "dataset_commit": v.lineage.dataset_commit,
            "mlflow_run_id": v.lineage.mlflow_run_id,
            "job": v.lineage.job_id,
            "job_kind": job_pb2.JobKind.Name(v.lineage.job_kind).removeprefix("JOB_KIND_").lower(),
        }
        for v in lineage.versions
    ]
    report("register", {"challenger": f"{name}:{version}", "lineage": chain})
    print("register: " + " <- ".join(link["version"] for link in chain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
