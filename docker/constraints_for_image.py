"""Print a pip constraints file: what is installed stays as it is, constraints.txt pins the rest.

Used by docker/Dockerfile.gpu after vLLM is installed, so that installing llmops with the project's
pins neither replaces vLLM's torch and CUDA packages nor leaves anything else unpinned.

Usage: python constraints_for_image.py constraints.txt > constraints-image.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def merge(installed: dict[str, str], path: str) -> list[str]:
    """`name==version` for every installed package, then constraints.txt's lines for the others."""
    installed = {canonical(name): version for name, version in installed.items()}
    lines = [f"{name}=={version}" for name, version in sorted(installed.items())]
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name = canonical(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])
            if name not in installed:
                lines.append(line)
    return lines


def main(path: str) -> int:
    installed = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    print("\n".join(merge(installed, path)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
