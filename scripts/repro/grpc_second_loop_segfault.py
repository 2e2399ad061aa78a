"""Standalone reproduction of the segfault in GC that ``tests/integration/test_security.py`` hit.

Root cause (grpcio 1.85, CPython 3.11): ``grpc._cython.cygrpc.AioServer.__dealloc__`` logs
``_LOGGER.debug("__dealloc__ called on running server %s with status %d", self, self._status)``
for any server whose status is not STOPPED. A never-started server has status READY (1), and
``stop()`` on it returns at once and leaves it READY. When a handler keeps log records (pytest's
``caplog`` after ``caplog.set_level(logging.DEBUG)``, or any list-collecting handler), the record's
``args`` tuple ``(server, 1)`` outlives the server: a Cython ``__dealloc__`` cannot resurrect its
object, so the memory is freed under that reference. The next GC pass that traverses the tuple
reads the freed (by then reused) block as an object and crashes in ``tupletraverse`` /
``visit_decref`` (gdb: the tuple traversed is that record's ``args``; item 1 is the int 1, item 0
the freed server's address, its block reused by an 84-character str). In the suite, old ``create_server`` built a ``grpc.aio.server`` and then raised
ValueError from ``server_credentials``; the refused server died later (in a cycle through pytest's
ExceptionInfo) during ``test_api_keys_never_reach_the_logs``, whose ``caplog`` was at DEBUG. The
second event loop of ``asyncio.run`` is not needed: ``--same-loop`` crashes the old code too.

Run from the repository root (``PYTHONPATH`` picks which ``llmops`` is imported)::

    PYTHONPATH=services .venv/bin/python -X faulthandler scripts/repro/grpc_second_loop_segfault.py \
        [--same-loop | --unbindable]

Modes:

* default: ``asyncio.run(create_server(tls_cert_file only))`` in a second loop, as the old test did;
* ``--same-loop``: the same refusal on the one loop of an ``asyncio.Runner`` (no second loop);
* ``--unbindable``: ``create_server`` on a port another server holds, so a server is built and
  fails to bind.

Before the fix (commit 1a219fe) the default and ``--same-loop`` modes print
``grpc logged a freed AioServer`` and die with ``Fatal Python error: Segmentation fault`` /
``Garbage-collecting`` (exit 139). After it they print ``no AioServer was freed unstopped`` and
``GC survived`` (exit 0): the refusal happens before any grpc object exists. ``--unbindable``
crashed the first fix too (the half-built server is stopped but was never started, so it stays
READY and its ``__dealloc__`` still logs ``self``); the runtime now also turns grpc's log arguments
into text as they are logged (``_StringifyArgs`` in ``llmops.common.server``), so a kept record holds
no pointer to the freed server and all three modes survive.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import tempfile
from pathlib import Path

from llmops.common.server import create_server
from llmops.common.settings import Settings

kept: list[logging.LogRecord] = []


class KeepRecords(logging.Handler):
    """What pytest's caplog does: holds every record, with its ``args``, until the test ends."""

    def emit(self, record: logging.LogRecord) -> None:
        kept.append(record)


async def _refuse(cert: Path) -> None:
    try:
        await create_server("127.0.0.1:0", [], Settings.model_validate({"tls_cert_file": cert}))
    except ValueError as exc:
        print(f"refused: {exc}", flush=True)


async def _unbindable() -> None:
    holder, port = await create_server("127.0.0.1:0", [], Settings())
    try:
        await create_server(f"127.0.0.1:{port}", [], Settings())
    except (OSError, RuntimeError) as exc:
        print(f"could not bind: {exc}", flush=True)
    await holder.stop(0)


def main(mode: str) -> None:
    logging.getLogger().addHandler(KeepRecords())
    logging.getLogger().setLevel(logging.DEBUG)  # caplog.set_level(logging.DEBUG)
    with tempfile.TemporaryDirectory() as folder:
        cert = Path(folder, "server.pem")
        cert.write_text("never read: the settings are refused first")
        if mode == "--same-loop":
            with asyncio.Runner() as runner:
                runner.run(_refuse(cert))
        elif mode == "--unbindable":
            asyncio.run(_unbindable())
        else:
            asyncio.run(_refuse(cert))  # a second loop, as the sync test's asyncio.run
    _report("after the refusal")
    gc.collect()  # frees the server if a reference cycle still held it; may already crash
    _report("after a GC pass")
    # Reuse freed blocks the way the suite did (an 84-character str filled the server's block), then
    # let GC traverse the record's args tuple.
    filler = [str(i).rjust(84, "x") for i in range(20000)]
    gc.collect()
    print(f"GC survived ({len(filler)} fillers, {len(kept)} records kept)", flush=True)


def _report(when: str) -> None:
    freed = sum(str(r.msg).startswith("__dealloc__ called on running server") for r in kept)
    if freed:  # never repr a record's args: their first item is the freed server
        print(f"{when}: grpc logged a freed AioServer ({freed} record(s) still hold it)", flush=True)
    else:
        print(f"{when}: no AioServer was freed unstopped", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
