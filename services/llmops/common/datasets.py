"""Data at a revision: a file of the DVC data repository, read as Git and DVC held it then.

A contract of every service that reads data by reference: training reads its dataset here,
quantization its calibration text, and the registry records a :class:`DatasetRef` (and the commit it
was read at) in a version's lineage. Files in the workspace are read directly; at a revision,
``dvc.api`` reads them (DVC-tracked files from the DVC cache or remote, Git-tracked ones from Git).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, caller_path

#: The request field a dataset reference sits in (errors name its parts).
FIELD = "spec.dataset"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """A data file at a revision of the DVC data repository (or an absolute ``file://`` URI)."""

    path: str
    revision: str = ""
    repo: str = ""


class DataRepository:
    """The DVC data repository at ``root`` (a Git work tree with ``.dvc/``, or a plain folder)."""

    def __init__(self, root: Path, *, max_bytes: int = 1 << 30) -> None:
        self.root = root
        self._max_bytes = max_bytes

    def read(self, ref: DatasetRef) -> tuple[bytes, str]:
        """The file's bytes and the commit they were read at (empty when not under Git).

        Raises:
            InvalidArgument: a path outside the repository, or a revision with an absolute URI.
            NotFound: no such file or revision.
        """
        if not ref.path:
            raise InvalidArgument("a path is required", field=f"{FIELD}.ref.path")
        if "://" in ref.path:
            return self._read_uri(ref), ""
        relative = Path(ref.path)
        if relative.is_absolute() or ".." in relative.parts:
            raise InvalidArgument(
                "a path relative to the data repository, without '..'", field=f"{FIELD}.ref.path"
            )
        if ref.repo or ref.revision:
            return self._read_at_revision(ref)
        path = self.root / relative
        with caller_path(ref.path, field=f"{FIELD}.ref.path"):
            if not path.is_file():
                raise NotFound(f"dataset {ref.path} does not exist in the data repository")
            content = self._checked(path.read_bytes())
        return content, self._workspace_commit(relative, content)

    def _read_uri(self, ref: DatasetRef) -> bytes:
        if ref.revision:
            raise InvalidArgument("must be empty for an absolute URI", field=f"{FIELD}.ref.revision")
        parsed = urlparse(ref.path)
        if parsed.scheme != "file":
            raise InvalidArgument(
                f"{parsed.scheme}:// datasets are not supported; use a data repository path or file://",
                field=f"{FIELD}.ref.path",
            )
        path = Path(unquote(parsed.path))
        with caller_path(ref.path, field=f"{FIELD}.ref.path"):
            if not path.is_file():
                raise NotFound(f"dataset {ref.path} does not exist")
            return self._checked(path.read_bytes())

    def _read_at_revision(self, ref: DatasetRef) -> tuple[bytes, str]:
        import dvc.api
        from dvc.exceptions import DvcException, PathMissingError

        repo = ref.repo or str(self.root)
        commit = ref.revision if _COMMIT.match(ref.revision) else ""
        if not ref.repo:
            commit = self._resolve_revision(ref.revision or "HEAD")
        with caller_path(ref.path, field=f"{FIELD}.ref.path"):  # too long, unreadable...
            try:
                data = dvc.api.read(ref.path, repo=repo, rev=commit or ref.revision or None, mode="rb")
            except (PathMissingError, FileNotFoundError):
                raise NotFound(
                    f"dataset {ref.path} does not exist at revision {ref.revision or 'HEAD'}"
                ) from None
            except DvcException as exc:
                raise FailedPrecondition(
                    f"cannot read dataset {ref.path}: {str(exc).splitlines()[0]}"
                ) from None
        return self._checked(bytes(data)), commit

    def _resolve_revision(self, revision: str) -> str:
        if revision.startswith("-"):
            raise InvalidArgument("not a revision", field=f"{FIELD}.ref.revision")
        done = self._git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
        if done is None:
            raise NotFound(f"revision {revision} does not exist in the data repository")
        return done

    def _workspace_commit(self, relative: Path, content: bytes) -> str:
        """HEAD's commit when the workspace file is what HEAD holds; empty when it is not (or unknown).

        A DVC-tracked file matches when its ``.dvc`` file is unchanged since HEAD and records the
        content's md5; a pipeline output when HEAD's ``dvc.lock`` records the content's md5; a
        Git-tracked one when ``git diff`` against HEAD is empty.
        """
        head = self._git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")
        if head is None:
            return ""
        pointer = relative.with_name(relative.name + ".dvc")
        if (self.root / pointer).is_file():
            import yaml

            try:
                outs = yaml.safe_load((self.root / pointer).read_text())["outs"]
                recorded = next(o["md5"] for o in outs if o.get("path") == relative.name)
            except (OSError, ValueError, KeyError, TypeError, StopIteration, yaml.YAMLError):
                return ""
            unchanged = self._git_ok("diff", "--quiet", "HEAD", "--", pointer.as_posix())
            return head if unchanged and recorded == hashlib.md5(content).hexdigest() else ""
        if (self.root / "dvc.lock").is_file():
            recorded_out = self._locked_md5(relative)
            if recorded_out is not None:
                return head if recorded_out == hashlib.md5(content).hexdigest() else ""
        tracked = self._git_ok("ls-files", "--error-unmatch", "--", relative.as_posix())
        clean = tracked and self._git_ok("diff", "--quiet", "HEAD", "--", relative.as_posix())
        return head if clean else ""

    def _locked_md5(self, relative: Path) -> str | None:
        """The md5 HEAD's ``dvc.lock`` records for a pipeline output at ``relative``; None if none."""
        import yaml

        text = self._git("show", "HEAD:./dvc.lock")
        if text is None:
            return None
        try:
            stages = yaml.safe_load(text).get("stages", {})
            for stage in stages.values():
                for out in stage.get("outs", []):
                    if out.get("path") == relative.as_posix():
                        return str(out.get("md5", ""))
        except (AttributeError, TypeError, yaml.YAMLError):
            return None
        return None

    def _git_ok(self, *args: str) -> bool:
        try:
            done = subprocess.run(
                ["git", "-C", str(self.root), *args], capture_output=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def _git(self, *args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(self.root), *args], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None

    def _checked(self, data: bytes) -> bytes:
        if len(data) > self._max_bytes:
            raise InvalidArgument(
                f"the dataset is {len(data)} bytes; this server takes at most {self._max_bytes}", field=FIELD
            )
        return data
