"""``make loadtest``: one headless Locust run, then its plots, all in ``build/loadtest/<UTC time>/``.

    .venv/bin/python -m loadtests.run                       # the local stack (`llmops up` / `make demo`)
    .venv/bin/python -m loadtests.run --serving 127.0.0.1:50054 --prometheus http://127.0.0.1:9090 \\
        --scenario stream --shape spike -u 8 -t 2m -- --max-p95-ttft-ms 500

Addresses not given are taken from the local stack's ``stack.json`` (in ``--data-dir``, default the
settings' data folder, as ``llmops status`` finds it); ``--serving`` alone needs no stack. Everything
after ``--`` goes to Locust unchanged (thresholds, ``--model``, ...). The folder gets ``locust_*.csv``,
``locust.html``, ``locust_summary.json``, the PNG plots (when a Prometheus is known) and
``index.html``. The exit code is Locust's: 0 passed, 1 failed calls beyond the budget, 2 the target
could not be reached, 3 a threshold was exceeded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loadtests.targets import EXIT_TARGET, stack_addresses

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO = LOCUSTFILE.parent.parent


def _data_dir(given: str) -> Path:
    if given:
        return Path(given)
    from llmops.common.settings import Settings

    return Path(Settings.load().data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving", default="", help="Serving gRPC HOST:PORT (default: the local stack's)")
    parser.add_argument("--registry", default="", help="Registry gRPC HOST:PORT (default: the local stack's)")
    parser.add_argument("--training", default="", help="Training gRPC HOST:PORT (default: the local stack's)")
    parser.add_argument(
        "--prometheus", default="", help="Prometheus URL for the plots (default: the stack's)"
    )
    parser.add_argument("--data-dir", default="", help="Where the local stack keeps stack.json")
    parser.add_argument("--model", default="", help="Served model name (default: the first READY one)")
    parser.add_argument("--scenario", default="mixed", help="mixed | generate | stream | cache | control")
    parser.add_argument("--shape", default="constant", help="constant | ramp | step | spike")
    parser.add_argument("-u", "--users", default="4", help="Peak users")
    parser.add_argument("-r", "--spawn-rate", default="2", help="Users started per second")
    parser.add_argument("-t", "--run-time", default="60s", help="Run length (Locust syntax: 30s, 2m)")
    parser.add_argument("--out", default="", help="Report folder (default: build/loadtest/<UTC time>)")
    parser.add_argument("--settle", type=float, default=6.0, help="Seconds to let Prometheus scrape the end")
    args = parser.parse_args(argv)

    try:
        data_dir = _data_dir(args.data_dir)
        found = dict(stack_addresses(data_dir))
    except Exception as exc:  # a settings error must not hide a run given its addresses
        data_dir, found = Path(args.data_dir or "?"), {}
        print(f"note: cannot read the local stack's state: {exc}", file=sys.stderr)
    if not args.serving and "serving" not in found:
        print(
            f"error: no local stack runs from {data_dir} (start one with `llmops up` or `make demo`), "
            "or give the address: make loadtest SERVING=HOST:PORT",
            file=sys.stderr,
        )
        return EXIT_TARGET
    serving = args.serving or found.get("serving", "")
    # A given serving address is a different target: the stack's other parts are not its own.
    same_stack = not args.serving or args.serving == found.get("serving")
    registry = args.registry or (found.get("registry", "") if same_stack else "")
    training = args.training or (found.get("training", "") if same_stack else "")
    prometheus = args.prometheus or (found.get("prometheus", "") if same_stack else "")

    out = Path(args.out or REPO / "build" / "loadtest" / time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", args.users, "-r", args.spawn_rate, "-t", args.run_time,
        "--scenario", args.scenario, "--shape", args.shape, "--serving", serving,
        "--csv", str(prefix), "--html", str(out / "locust.html"),
        *(["--registry", registry] if registry else []),
        *(["--training", training] if training else []),
        *(["--model", args.model] if args.model else []),
        *extra,
    ]  # fmt: skip
    print(f"load test -> {out}\n  serving {serving}, registry {registry or '-'}, training {training or '-'}")
    code = subprocess.call(command, cwd=REPO)
    if code == EXIT_TARGET:
        print("the load test did not start (see the error above): no report", file=sys.stderr)
        return code

    from loadtests import plots

    panels: list[plots.PanelResult] = []
    note = ""
    try:
        start, end = plots.run_window(str(prefix))
    except (OSError, ValueError) as exc:
        start = end = time.time()
        note = f"no run window: {exc}"
    if prometheus and not note:
        time.sleep(args.settle)
        panels, note = plots.plot_run(prometheus, start, end + args.settle, out)
    elif not prometheus:
        note = "no Prometheus known (give --prometheus / PROMETHEUS=URL): plots skipped"
    index = plots.write_index(
        out,
        start=start,
        end=end,
        panels=panels,
        note=note,
        run_prefix=str(prefix),
        locust_html=str(out / "locust.html"),
    )
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"report: {index} (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
