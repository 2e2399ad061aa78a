"""The data-parallel job's coordinator, without Ray: what the service reads from it.

Invariants: rank 0's step events reach the service with every rank's latest step time folded in as
``worker<r>_step_seconds`` (the figures that differ per rank); a rank that (re)starts is logged with
where it runs; events are read from a cursor, so a reader that comes back reads on where it stopped;
checkpoints are named where Ray Train's storage keeps them (a local folder or an ``s3://`` URI).
"""

from __future__ import annotations

from pathlib import Path

from llmops.training.distributed import checkpoint_uri
from llmops.training.runners.ray_train import TrainCoordinator, coordinator_name, cpus_per_worker


def test_rank_step_times_join_rank_zeros_step_events_and_ranks_are_logged() -> None:
    coordinator = TrainCoordinator(coordinator_name("tj-1"), "llmops-training")
    coordinator.emit({"kind": "rank", "rank": 0, "pid": 11, "worker": "node-a pid 11"})
    coordinator.emit({"kind": "rank", "rank": 1, "pid": 12, "worker": "node-b pid 12"})
    coordinator.emit({"kind": "rank", "rank": 1, "step_seconds": 0.5})
    coordinator.emit({"kind": "rank", "rank": 0, "step_seconds": 0.25})
    coordinator.emit(
        {"kind": "step", "phase": "train", "step": 3, "loss": 1.5, "metrics": {"grad_norm": 2.0}}
    )

    events, outcome = coordinator.poll(0, 0.0)

    assert outcome is None  # still running
    assert [e["message"] for e in events if e["kind"] == "log"] == [
        "rank 0 runs on node-a pid 11",
        "rank 1 runs on node-b pid 12",
    ]
    (step,) = [e for e in events if e["kind"] == "step"]
    assert step["metrics"] == {"grad_norm": 2.0, "worker0_step_seconds": 0.25, "worker1_step_seconds": 0.5}
    assert coordinator.ranks()[1] == {"pid": 12, "worker": "node-b pid 12", "step_seconds": 0.5}
    assert coordinator.poll(len(events), 0.0) == ([], None)  # read on from the cursor: nothing new
    coordinator.emit({"kind": "checkpoint", "step": 5, "uri": "s3://b/tj-1/checkpoint-5"})
    assert [e["kind"] for e in coordinator.poll(len(events), 0.0)[0]] == ["checkpoint"]


def test_checkpoints_are_named_where_ray_train_storage_keeps_them(tmp_path: Path) -> None:
    assert checkpoint_uri(str(tmp_path), "tj-1", 5) == (tmp_path / "tj-1" / "checkpoint-5").as_uri()
    assert checkpoint_uri("s3://bucket/runs/", "tj-1", 5) == "s3://bucket/runs/tj-1/checkpoint-5"


def test_the_progress_bar_shows_each_workers_step_time_in_rank_order() -> None:
    from llmops.proto.common.v1 import job_pb2
    from llmops.training.cli import _stats

    step = job_pb2.JobStep(
        step=3,
        total_steps=10,
        loss=1.5,
        metrics={
            "worker0_step_seconds": 0.3,
            "worker10_step_seconds": 0.5,
            "worker2_step_seconds": 0.4,
            "x": 1,
        },
    )
    assert _stats(step) == "step 3/10  loss 1.5000  s/step by worker 0.30/0.40/0.50"
    assert "by worker" not in _stats(job_pb2.JobStep(step=3, loss=1.5))  # one worker: as before


def test_ranks_share_an_embedded_runtime_and_ask_a_cluster_for_what_they_need() -> None:
    assert cpus_per_worker(3.0, 2.0, 2, 2.0, fixed=True) == 3.0  # the job's own figure stands
    assert cpus_per_worker(0.0, 2.0, 2, 2.0, fixed=True) == 1.0  # 2 ranks on a 2-core embedded runtime
    assert cpus_per_worker(0.0, 2.0, 4, 2.0, fixed=True) == 1.0  # never below one
    assert cpus_per_worker(0.0, 2.0, 2, 8.0, fixed=True) == 2.0  # it fits: the default
    assert cpus_per_worker(0.0, 2.0, 8, 4.0, fixed=False) == 2.0  # a cluster grows: ask for the default
