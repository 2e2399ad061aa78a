"""Run every benchmark in this folder, one after another (`make bench`).

Each benchmark measures its own baseline in the same run and prints ratios against it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = 0
    scripts = sorted(p for p in HERE.glob("*.py") if p.name not in {"run.py", "__init__.py"})
    scripts += sorted(HERE.glob("*/run.py"))
    for script in scripts:
        print(f"== {script.relative_to(HERE.parent)}", flush=True)
        failed += subprocess.call([sys.executable, str(script)]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
