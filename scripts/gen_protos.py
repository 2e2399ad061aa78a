#!/usr/bin/env python3
"""Generate the Python code for every .proto under protos/ into services/llmops/proto/.

The protos are the single source of truth; the generated tree is committed and never edited by
hand. protoc (from grpcio-tools, with its bundled well-known types) writes messages (`_pb2.py`),
gRPC stubs (`_pb2_grpc.py`, only for files that define a service) and mypy-protobuf stubs
(`.pyi`) into a temporary folder. The `llmops/...` tree it produces is then moved under
services/llmops/proto/, which the Python package `llmops` (the folder services/llmops/) exposes as
`llmops.proto`, so generated imports are rewritten from `llmops.` to `llmops.proto.`.

Usage:
    python scripts/gen_protos.py              # regenerate services/llmops/proto/
    python scripts/gen_protos.py --out DIR    # regenerate into DIR instead
    python scripts/gen_protos.py --check      # exit 1, listing files, if DIR drifts from protos/

The output is deterministic (sorted inputs, no timestamps), so --check can compare bytes. It
depends on the versions of grpcio-tools, protobuf and mypy-protobuf: use the ones pinned in
constraints.txt.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
DEFAULT_OUT = REPO_ROOT / "services" / "llmops" / "proto"

# The proto package root (protos/llmops/...) and the Python package the output is imported as.
PROTO_TOP = "llmops"
PYTHON_PACKAGE = "llmops.proto"

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
ROOT_INIT = '"""Generated protobuf and gRPC modules. Do not edit: run scripts/gen_protos.py."""\n'

_SERVICE_RE = re.compile(r"^\s*service\s+\w+\s*\{", re.MULTILINE)
# Import lines protoc, grpc and mypy-protobuf write for our own packages.
_IMPORT_RE = re.compile(rf"^(\s*)(from|import) {PROTO_TOP}\.(?!proto\.)", re.MULTILINE)
# The module name _pb2.py passes to the descriptor builder (becomes the classes' __module__).
_MODULE_NAME_RE = re.compile(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, '){PROTO_TOP}\.")
# The path of the module named in grpc's version-mismatch message.
_GRPC_PATH_RE = re.compile(rf"(generated code in ){PROTO_TOP}/")


class GenerationError(RuntimeError):
    """protoc or a plugin is missing or failed."""


def find_protos(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto under proto_root, relative to it, in a stable order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def _plugin(name: str) -> Path:
    # The venv's bin/ may not be on PATH when the script runs as .venv/bin/python.
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        raise GenerationError(f"{name} not found: install mypy-protobuf (pinned in constraints.txt)")
    return Path(found)


def _well_known_include() -> Path:
    try:
        import grpc_tools
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise GenerationError("grpcio-tools is not installed (pinned in constraints.txt)") from exc
    return Path(grpc_tools.__file__).parent / "_proto"


def run_protoc(protos: list[Path], dest: Path, proto_root: Path = PROTO_ROOT) -> None:
    """Run protoc with the python, grpc_python, mypy and mypy_grpc generators into dest."""
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"-I{_well_known_include()}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={dest}",
        f"--grpc_python_out={dest}",
        f"--mypy_out={dest}",
        f"--mypy_grpc_out={dest}",
        *(p.as_posix() for p in protos),
    ]
    result = subprocess.run(cmd, cwd=proto_root, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GenerationError(f"protoc failed:\n{result.stderr.strip()}")


def rewrite_imports(text: str) -> str:
    """Point generated references to our packages at llmops.proto.*."""
    text = _IMPORT_RE.sub(rf"\1\2 {PYTHON_PACKAGE}.", text)
    text = _MODULE_NAME_RE.sub(rf"\g<1>{PYTHON_PACKAGE}.", text)
    return _GRPC_PATH_RE.sub(rf"\g<1>{PYTHON_PACKAGE.replace('.', '/')}/", text)


def generate(stage: Path, proto_root: Path = PROTO_ROOT) -> dict[str, bytes]:
    """Generate every module; return {path relative to the output folder: contents}."""
    protos = find_protos(proto_root)
    if not protos:
        raise GenerationError(f"no .proto files under {proto_root.name}/")
    raw = stage / "raw"
    raw.mkdir()
    run_protoc(protos, raw, proto_root)

    without_service = {
        p.with_suffix("").as_posix()
        for p in protos
        if not _SERVICE_RE.search((proto_root / p).read_text(encoding="utf-8"))
    }
    files: dict[str, bytes] = {}
    for path in sorted((raw / PROTO_TOP).rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(raw / PROTO_TOP).as_posix()
        stem = f"{PROTO_TOP}/{rel}".rsplit("_pb2", 1)[0]
        if "_pb2_grpc." in rel and stem in without_service:
            continue  # grpc plugin output for a file with no service: only a version check
        text = rewrite_imports(path.read_text(encoding="utf-8"))
        leftover = [m.group(0) for m in _IMPORT_RE.finditer(text)]
        if leftover:
            raise GenerationError(f"{rel}: unrewritten imports {leftover}")
        files[rel] = text.encode("utf-8")

    folders = {""} | {str(Path(rel).parent.as_posix()) for rel in files}
    for folder in list(folders):  # every ancestor folder is a package too
        parts = folder.split("/") if folder else []
        folders.update("/".join(parts[:i]) for i in range(len(parts)))
    for folder in sorted(folders):
        init = f"{folder}/__init__.py" if folder else "__init__.py"
        files[init] = ROOT_INIT.encode("utf-8") if not folder else b""
    return dict(sorted(files.items()))


def _is_ours(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name == "__init__.py" or name.endswith(GENERATED_SUFFIXES)


def existing_files(out: Path) -> dict[str, bytes]:
    """Files now under out (ignoring bytecode caches), relative to it."""
    if not out.exists():
        return {}
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "__pycache__" not in p.relative_to(out).parts
    }


def diff(expected: dict[str, bytes], actual: dict[str, bytes]) -> list[str]:
    """Lines naming every file that is missing, extra or different."""
    lines = []
    for rel in sorted(expected.keys() | actual.keys()):
        if rel not in actual:
            lines.append(f"missing:  {rel}")
        elif rel not in expected:
            lines.append(f"extra:    {rel}")
        elif expected[rel] != actual[rel]:
            lines.append(f"differs:  {rel}")
    return lines


def write(out: Path, files: dict[str, bytes]) -> None:
    """Replace the generated tree in out with files; refuse to delete anything else."""
    current = existing_files(out)
    foreign = sorted(rel for rel in current if not _is_ours(rel))
    if foreign:
        raise GenerationError(
            f"{out.name}/ holds files the generator did not write; move them first: {foreign}"
        )
    for rel in current:
        (out / rel).unlink()
    for cache in sorted(out.rglob("__pycache__"), reverse=True) if out.exists() else []:
        shutil.rmtree(cache)
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True) if out.exists() else []:
        if not any(folder.iterdir()):
            folder.rmdir()
    for rel, data in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder to generate into (default: services/llmops/proto)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 listing the files in --out that differ from a fresh generation",
    )
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()

    try:
        with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
            files = generate(Path(tmp))
        if args.check:
            problems = diff(files, existing_files(out))
            if problems:
                print(f"generated code drifted from protos/ ({len(problems)} files):", file=sys.stderr)
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print(f"generated code is up to date ({len(files)} files)")
            return 0
        write(out, files)
    except GenerationError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 2
    print(f"generated {len(files)} files from {len(find_protos())} protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
