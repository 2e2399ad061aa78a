"""How long vLLM's EngineCore spent reading the weights, for the ``weights`` cold-start phase.

vLLM loads the model inside its EngineCore child process and reports the time only in its log
("Loading weights took 0.12 seconds"). :func:`engine_core_log` gives the child, for the duration of
one engine start, vLLM's own logging configuration plus a file handler at INFO (through
``VLLM_LOGGING_CONFIG_PATH``, which a spawned child reads when it imports vLLM); its console output
keeps ``VLLM_LOGGING_LEVEL``. The parent has configured its logging already and is not affected. Where the operator
set their own ``VLLM_LOGGING_CONFIG_PATH`` (or turned vLLM's logging configuration off), nothing is
changed and the split is unknown (the whole start counts as engine start).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_WEIGHTS = (
    re.compile(r"Loading weights took ([0-9.]+) seconds"),
    re.compile(r"Model loading took .*? and ([0-9.]+) seconds"),
)
_CONFIG_VARIABLE = "VLLM_LOGGING_CONFIG_PATH"


def weights_seconds(log_text: str) -> float | None:
    """The weight-loading seconds vLLM logged (None when it logged none)."""
    for pattern in _WEIGHTS:
        found = pattern.findall(log_text)
        if found:
            return float(found[-1])
    return None


@contextlib.contextmanager
def engine_core_log() -> Iterator[Callable[[], str]]:
    """While active, EngineCore processes vLLM spawns also log to a file; yields its reader."""
    if os.environ.get(_CONFIG_VARIABLE) or os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        yield lambda: ""
        return
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    global _STARTS
    _STARTS += 1
    folder = process_folder()
    log_file = folder / f"engine-core-{_STARTS}.log"
    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["handlers"]["llmops_phases"] = {
        "class": "logging.FileHandler",
        "filename": str(log_file),
        "level": "INFO",
        "formatter": "vllm",
    }
    logger = config["loggers"]["vllm"]
    logger["handlers"] = [*logger["handlers"], "llmops_phases"]
    # the console handler keeps its own level (VLLM_LOGGING_LEVEL); the file needs INFO records
    if logging.getLevelName(str(logger.get("level", "INFO")).upper()) > logging.INFO:
        logger["level"] = "INFO"
    config_file = folder / f"logging-{_STARTS}.json"
    config_file.write_text(json.dumps(config))
    os.environ[_CONFIG_VARIABLE] = str(config_file)
    try:
        yield lambda: log_file.read_text(errors="replace") if log_file.is_file() else ""
    finally:
        os.environ.pop(_CONFIG_VARIABLE, None)


_STARTS = 0
_FOLDER: Path | None = None


def process_folder() -> Path:
    """One folder per process for vLLM's files, removed when it exits, never before.

    It holds the log configurations below and vLLM's ZMQ IPC sockets (``VLLM_RPC_BASE_PATH``, set by
    the engine): vLLM names one socket per engine start in the temp folder and never unlinks it, so
    a long-lived server that reloads models, or a test suite, would leave thousands behind.

    A handler vLLM configured from one of these files (in a child, or in this process when vLLM
    configures its logging again) may reopen its file at any later time, e.g. to log its shutdown:
    a folder removed at the end of the start made that shutdown fail and leave the EngineCore running.
    """
    global _FOLDER
    if _FOLDER is None or not _FOLDER.is_dir():
        _FOLDER = Path(tempfile.mkdtemp(prefix="llmops-vllm-log-"))
        atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)
    return _FOLDER
