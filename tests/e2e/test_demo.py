"""The main job end to end (``llmops demo --fast``) on a copy of the repository's pipeline.

Invariants: on a fresh stack the DVC pipeline takes the data from ingest to a promoted, served
version; the served champion's lineage runs back through the INT8 quantization job and the LoRA
training job to the imported base, and the training link names the dataset path and the data
repository commit that holds those bytes (HEAD, whose dvc.lock records them) and its MLflow run;
DVC pushed the data to its remote and pulls it back; a repeated deterministic request is answered from the cache
with the same text.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import DemoRun

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_demo_runs_the_loop_and_serves_the_champion_with_its_lineage(demo_run: DemoRun) -> None:
    assert Path(sys.executable).with_name("dvc").exists()
    result, pipeline, head = demo_run.result, demo_run.pipeline, demo_run.head

    promote = result.reports["promote"]
    champion = result.lineage[0]
    assert champion["version"] == promote["champion_after"]
    served = {row.get("served") for row in result.requests if "served" in row}
    assert served == {champion["version"]}
    if promote["promoted"]:
        # champion = the INT8 version <- the merged LoRA fine-tune <- the imported base
        assert [link["format"] for link in result.lineage] == ["int8", "fp32", "fp32"]
        quantized, trained, base = result.lineage
        assert quantized["parent"] == trained["version"] and trained["parent"] == base["version"]
        assert quantized["job"].startswith("qj-") and trained["job"].startswith("tj-")
        assert trained["dataset"] == "data/prepared/sft.jsonl"
        assert trained["dataset_commit"] == head[:12]  # the data repository commit that holds the bytes
        assert trained["mlflow_run"] and quantized["mlflow_run"]
        assert base["parent"] == "" and base["version"] == "assistant:1"
    else:
        assert champion["version"] == "assistant:1"

    first, repeat = result.requests[1], result.requests[2]
    assert not first["cached"] and repeat["cached"] and repeat["text"] == first["text"]
    assert result.requests[0]["text"]  # the streamed answer arrived
    remote = demo_run.root / ".llmops" / "dvc-remote"
    assert any(remote.rglob("*")), "dvc push left the remote empty"
    # What was pushed comes back: drop the prepared data and the local cache, then `dvc pull`.
    sft = pipeline / "data" / "prepared" / "sft.jsonl"
    expected = sft.read_bytes()
    sft.unlink()
    shutil.rmtree(pipeline / ".dvc" / "cache")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "pull", "-q", "build"], cwd=pipeline, check=True, capture_output=True)
    assert sft.read_bytes() == expected
