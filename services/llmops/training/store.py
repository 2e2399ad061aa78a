"""Where the training service keeps its jobs: one folder per job under the work folder.

``<root>/<job id>/`` holds ``job.json`` (the record, replaced atomically on every change),
``events.jsonl`` (appended, one event per line), ``dataset.jsonl`` (the validated snapshot the
worker trains on), ``checkpoints/`` and ``output/``. A restarted service reads it back and resumes
what was not finished. On a cluster the folder is a shared volume that the Ray workers mount too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

from llmops.training.domain import Job, JobEvent

log = logging.getLogger(__name__)


class JobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def write_dataset(self, job_id: str, content: bytes) -> Path:
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "dataset.jsonl"
        path.write_bytes(content)
        return path

    def save(self, job: Job) -> None:
        folder = self.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps(job.to_dict(), sort_keys=True)
        partial = folder / f".job.json.{threading.get_ident()}.partial"
        partial.write_text(data)
        os.replace(partial, folder / "job.json")

    def append_events(self, job_id: str, events: Iterable[JobEvent]) -> None:
        lines = "".join(json.dumps(e.to_dict(), sort_keys=True) + "\n" for e in events)
        if not lines:
            return
        with self._lock, (self.job_dir(job_id) / "events.jsonl").open("a") as handle:
            handle.write(lines)

    def load(self) -> list[tuple[Job, list[JobEvent]]]:
        """Every readable job with its events; a folder that does not parse is skipped and logged."""
        found = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            record = folder / "job.json"
            if not record.is_file():
                continue
            try:
                job = Job.from_dict(json.loads(record.read_text()))
                events = []
                events_file = folder / "events.jsonl"
                if events_file.is_file():
                    for line in events_file.read_text().splitlines():
                        try:
                            events.append(JobEvent.from_dict(json.loads(line)))
                        except ValueError:  # a line cut short by a crash mid-write
                            break
            except (ValueError, KeyError, TypeError):
                log.warning("skipping unreadable training job folder %s", folder.name, exc_info=True)
                continue
            found.append((job, events))
        return found

    def remove_scratch(self, job_id: str, *, keep_output: bool) -> None:
        """Free disk: checkpoints always, the output folder unless ``keep_output``."""
        folder = self.job_dir(job_id)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        if not keep_output:
            shutil.rmtree(folder / "output", ignore_errors=True)
            shutil.rmtree(folder / "output.partial", ignore_errors=True)
