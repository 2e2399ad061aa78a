"""The promote stage's gate verdicts land on the candidate's MLflow run (a real SQLite tracking store).

Invariant: each verdict becomes a ``gate.<gate>`` tag (passed/FAILED and why) and its finite numbers
``gate.<gate>.<number>`` metrics; a number that is not finite (nothing measured) is left out; a run
id that is empty or unknown is reported in words, never raised (the gates decided already).
"""

from __future__ import annotations

import math
from pathlib import Path

from pipelines.stages.gates import GateVerdict, record_in_mlflow


def test_verdicts_become_tags_and_metrics_of_the_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("gates", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    verdicts = [
        GateVerdict("evaluation", True, "m:2 beats m:1"),
        GateVerdict(
            "load",
            False,
            "breached: error ratio 0.2 (<= 0.01)",
            {"error_ratio": 0.2, "ttft_p95_ms": math.nan, "requests": 10.0},
        ),
    ]
    said = record_in_mlflow(uri, run_id, verdicts)
    assert said == f"MLflow run {run_id}: 2 gate verdicts logged"
    run = client.get_run(run_id)
    assert run.data.tags["gate.evaluation"] == "evaluation gate passed: m:2 beats m:1"
    assert run.data.tags["gate.load"].startswith("load gate FAILED: breached: error ratio 0.2")
    assert run.data.metrics == {"gate.load.error_ratio": 0.2, "gate.load.requests": 10.0}

    assert "no MLflow run" in record_in_mlflow(uri, "", verdicts)
    assert "not logged" in record_in_mlflow(uri, "0" * 32, verdicts)
