"""What every quantization method provides, and the spec and result types they share.

A :class:`Quantizer` reads a model folder in Hugging Face layout and writes a quantized folder that
its own :meth:`Quantizer.load_for_eval` (and, where a standard format exists, plain
``from_pretrained``) loads back. Validation lives here so every method rejects the same way: an
unsupported combination is ``INVALID_ARGUMENT`` naming the supported ones; a source that is already
quantized is ``FAILED_PRECONDITION``.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from llmops.common.errors import FailedPrecondition, InvalidArgument, NotFound, caller_path

if TYPE_CHECKING:
    import torch

#: File written into every result folder: which method made it, and with what settings.
MARKER_FILE = "llmops_quantization.json"
#: Extensions of the files whose bytes count as "model size".
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
#: Non-weight files copied from the source so the result loads on its own (tokenizer, generation).
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)

ProgressFn = Callable[[float], None]


#: Calibration defaults (the proto's DatasetSample: 0 means 128 sequences of 512 tokens) and bound.
DEFAULT_CALIBRATION_SAMPLES = 128
DEFAULT_CALIBRATION_SEQ_LEN = 512
MAX_CALIBRATION_TOKENS = 1 << 19


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """Calibration text for GPTQ/AWQ (the proto's ``calibration`` DatasetSample).

    ``text_path`` is a text file, a ``.jsonl`` file of records with ``text`` (or chat ``messages``),
    or a folder of ``.py``/``.txt``/``.md`` files; ``None`` means the default held-out text that
    ``evaluate.heldout_texts`` reads. ``dataset`` is the reference as submitted (path, revision, repo),
    recorded in the result's lineage; ``None`` for the default text. A reference with a revision (or
    a repo) names a file of the DVC data repository: the service reads it there at submission into a
    snapshot file, which ``text_path`` then names, and ``dataset_commit`` is the commit it was read
    at. Zero sizes mean the defaults.
    """

    num_samples: int = 0
    seq_len: int = 0
    text_path: Path | None = None
    dataset: tuple[str, str, str] | None = None
    dataset_commit: str = ""

    @property
    def versioned(self) -> bool:
        """Whether the data is a file of the data repository at a revision (or of another repo)."""
        return self.dataset is not None and bool(self.dataset[1] or self.dataset[2])


@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
    """How to quantize, in domain terms (the proto's method/bits/group_size/gguf_type/device and
    calibration).

    Zero values mean "the method's default", as in the proto. ``calibration`` is required by the
    calibrated methods (GPTQ, AWQ) and dropped by :meth:`Quantizer.validate` for the others.
    """

    method: str
    bits: int = 0
    group_size: int = 0
    gguf_type: str = ""
    device: str = "cpu"
    calibration: CalibrationSpec | None = None


@dataclasses.dataclass(frozen=True)
class QuantizedArtifact:
    """A written result folder."""

    path: Path
    method: str
    format: str  # "int8" | "int4" | "gguf"
    size_bytes: int
    settings: Mapping[str, Any]


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files in ``folder`` (not config or tokenizer files)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def ensure_not_quantized(src_dir: Path) -> None:
    """Raise ``FailedPrecondition`` when ``src_dir`` already holds a quantized model."""
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise InvalidArgument(f"{src_dir.name} has no config.json (not a Hugging Face model folder)")
    config = json.loads(config_path.read_text())
    if (src_dir / MARKER_FILE).exists() or config.get("quantization_config"):
        raise FailedPrecondition("the source model is already quantized; quantize its full-precision parent")


class Quantizer(abc.ABC):
    """One quantization method.

    Subclasses set the class attributes, implement :meth:`quantize` and :meth:`load_for_eval`, and
    may narrow :meth:`validate`.
    """

    name: ClassVar[str]
    result_format: ClassVar[str]
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    supported_bits: ClassVar[tuple[int, ...]]
    #: Allowed ``group_size`` values, 0 (the default) included; ``()`` means the field is ignored.
    supported_group_sizes: ClassVar[tuple[int, ...]] = ()
    needs_calibration: ClassVar[bool] = False
    #: Whether :meth:`load_for_eval` runs the quantized kernels, so its tokens/s mean something;
    #: False where it dequantizes into a plain float model (the result's speed is then not measured).
    measures_speed: ClassVar[bool] = True

    def validate(self, spec: QuantizationSpec) -> QuantizationSpec:
        """Check ``spec`` for this method and return it with defaults filled in.

        Raises:
            InvalidArgument: naming the supported values of the offending field.
        """
        if spec.device not in self.devices:
            raise InvalidArgument(
                f"{self.name} runs on {_names(self.devices)} here, not {spec.device!r}", field="device"
            )
        bits = spec.bits or self.supported_bits[0]
        if bits not in self.supported_bits:
            raise InvalidArgument(
                f"{self.name} supports bits {_names(self.supported_bits)}, not {spec.bits}", field="bits"
            )
        group_size = spec.group_size
        if self.supported_group_sizes:
            if group_size not in (0, *self.supported_group_sizes):
                raise InvalidArgument(
                    f"{self.name} supports group_size {_names(self.supported_group_sizes)} "
                    f"(0 means 128), not {group_size}",
                    field="group_size",
                )
            group_size = group_size or 128
        elif group_size not in (0,):
            raise InvalidArgument(f"{self.name} takes no group_size (got {group_size})", field="group_size")
        if spec.gguf_type and self.name != "gguf":
            raise InvalidArgument(
                f"gguf_type is only for the gguf method, not {self.name}", field="gguf_type"
            )
        calibration = self._validate_calibration(spec.calibration) if self.needs_calibration else None
        return dataclasses.replace(spec, bits=bits, group_size=group_size, calibration=calibration)

    def _validate_calibration(self, calibration: CalibrationSpec | None) -> CalibrationSpec:
        """The calibration spec with defaults filled in; ``InvalidArgument`` when it is missing or bad."""
        if calibration is None:
            raise InvalidArgument(
                f"{self.name} needs calibration data: set calibration (a DatasetSample; an empty "
                "ref.path means the default held-out text)",
                field="calibration",
            )
        if calibration.num_samples < 0 or calibration.seq_len < 0:
            raise InvalidArgument("num_samples and seq_len must be >= 0", field="calibration")
        num_samples = calibration.num_samples or DEFAULT_CALIBRATION_SAMPLES
        seq_len = calibration.seq_len or DEFAULT_CALIBRATION_SEQ_LEN
        if num_samples * seq_len > MAX_CALIBRATION_TOKENS:
            raise InvalidArgument(
                f"at most {MAX_CALIBRATION_TOKENS} calibration tokens (num_samples x seq_len), "
                f"not {num_samples} x {seq_len}",
                field="calibration",
            )
        if calibration.versioned:
            assert calibration.dataset is not None
            ref_path = Path(calibration.dataset[0])
            if not calibration.dataset[0] or ref_path.is_absolute() or ".." in ref_path.parts:
                raise InvalidArgument(
                    "with a revision or repo, ref.path is a file's path relative to the data "
                    "repository (without '..')",
                    field="calibration.ref.path",
                )
        path = calibration.text_path
        # a versioned reference is read from the data repository (the service snapshots it)
        if path is not None and not calibration.versioned:
            with caller_path(path, field="calibration.ref.path"):  # too long, unreadable...
                if not path.exists():
                    raise NotFound(f"calibration data {path} does not exist")
        return dataclasses.replace(calibration, num_samples=num_samples, seq_len=seq_len)

    @abc.abstractmethod
    def quantize(
        self,
        src_dir: Path,
        out_dir: Path,
        spec: QuantizationSpec,
        calibration: Sequence[torch.Tensor] | None = None,
        progress: ProgressFn | None = None,
    ) -> QuantizedArtifact:
        """Quantize the model in ``src_dir`` into ``out_dir`` (created; must be empty or missing).

        Args:
            src_dir: A full-precision model folder in Hugging Face layout.
            out_dir: Where the result goes.
            spec: A spec already passed through :meth:`validate`.
            calibration: Token id tensors ``(1, seq)`` for calibrated methods; ignored otherwise.
            progress: Called with the fraction done, in [0, 1].
        """

    @abc.abstractmethod
    def load_for_eval(self, out_dir: Path) -> Any:
        """Load a result folder as a ``torch.nn.Module`` causal LM (``generate`` and ``.logits``)."""

    # helpers for subclasses ----------------------------------------------------------------------

    def _finish(
        self, src_dir: Path, out_dir: Path, spec: QuantizationSpec, **extra: Any
    ) -> QuantizedArtifact:
        """Copy tokenizer files, write the marker, and describe the result."""
        for name in _COPIED_FILES:
            if (src_dir / name).is_file() and not (out_dir / name).exists():
                shutil.copy2(src_dir / name, out_dir / name)
        settings = {
            "method": self.name,
            "bits": spec.bits,
            "group_size": spec.group_size,
            "gguf_type": spec.gguf_type,
            **extra,
        }
        (out_dir / MARKER_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return QuantizedArtifact(
            path=out_dir,
            method=self.name,
            format=self.result_format,
            size_bytes=weight_bytes(out_dir),
            settings=settings,
        )


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``; refuse one that already has files (a result is never overwritten)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FailedPrecondition(f"output folder {out_dir.name} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)


def _names(values: Sequence[Any] | frozenset[Any]) -> str:
    items = sorted(values, key=str) if isinstance(values, frozenset) else list(values)
    return ", ".join(str(v) for v in items)
