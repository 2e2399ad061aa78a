"""Make one vendored schema file from an operator's CustomResourceDefinition YAML.

Keeps the ``openAPIV3Schema`` of one served version and drops every ``description`` (the text is
most of a CRD's size and nothing validates against it); the schema is otherwise unchanged.

    python tests/charts/crds/trim_crd.py CRD.yaml VERSION OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strip_descriptions(node: Any) -> Any:
    """The schema without ``description`` keys of schema objects (a property named so is kept)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            if key == "properties" and isinstance(value, dict):
                out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
            else:
                out[key] = strip_descriptions(value)
        return out
    if isinstance(node, list):
        return [strip_descriptions(item) for item in node]
    return node


def trim(crd_yaml: str, version: str) -> dict[str, Any]:
    crd = next(doc for doc in yaml.safe_load_all(crd_yaml) if doc)
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return {
                "group": crd["spec"]["group"],
                "kind": crd["spec"]["names"]["kind"],
                "version": version,
                "openAPIV3Schema": strip_descriptions(served["schema"]["openAPIV3Schema"]),
            }
    raise SystemExit(f"{crd['metadata']['name']} serves no version {version}")


if __name__ == "__main__":
    source, version, target = sys.argv[1:4]
    Path(target).write_text(json.dumps(trim(Path(source).read_text(), version), sort_keys=True) + "\n")
