"""The body of a quantization job: what runs in the worker process (a Ray actor, or a thread).

``run(plan, emit, stop)`` loads the source's tokenizer (and the evaluation and calibration text),
measures the source, quantizes it into ``plan.out_dir`` (the quantizer's progress callback reports
``quantize`` steps), measures the result, and returns the measurements with the result folder. It
reports through ``emit`` (``{"kind": "step", "phase": ..., "progress": ...}``) and stops with
:class:`~llmops.common.runners.Cancelled` at its next check once ``stop`` is set: before each phase,
at every progress report of the quantizer, and before returning. Registration, MLflow tracking and
the job book stay in the service (:mod:`llmops.quantization.service`).

The plan crosses into the worker as a plain dict (:meth:`Plan.to_dict`); its paths are the
worker's (a shared volume on a cluster). Ray workers use every method of
:func:`~llmops.quantization.methods.default_quantizers`; a thread runner may hand its own.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmops.common.runners.base import Cancelled, Emit
from llmops.quantization import evaluate
from llmops.quantization.calibration import calibration_windows
from llmops.quantization.methods import (
    CalibrationSpec,
    QuantizationSpec,
    Quantizer,
    default_quantizers,
    resolve,
)
from llmops.quantization.methods.base import weight_bytes

#: The import path Ray workers call.
BODY = "llmops.quantization.worker:run"
#: Progress at the start of each phase, and the share of the bar the quantizer's own progress gets.
CALIBRATE, EVALUATE_BEFORE, QUANTIZE, QUANTIZE_SHARE, EVALUATE_AFTER = 0.02, 0.05, 0.3, 0.4, 0.7


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a worker needs for one job, checked and with defaults filled in."""

    job_id: str
    source_dir: Path
    out_dir: Path
    quantization: QuantizationSpec
    #: Perplexity windows (0: not measured), their length, the held-out text (None: the default).
    eval_samples: int = 0
    eval_seq_len: int = evaluate.DEFAULT_SEQ_LEN
    eval_text_path: Path | None = None
    #: Tokens generated for tokens/s (0: not measured).
    throughput_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: paths as strings, the calibration reference as a list."""
        spec = self.quantization
        calibration = spec.calibration
        return {
            "job_id": self.job_id,
            "source_dir": str(self.source_dir),
            "out_dir": str(self.out_dir),
            "quantization": {
                "method": spec.method,
                "bits": spec.bits,
                "group_size": spec.group_size,
                "gguf_type": spec.gguf_type,
                "device": spec.device,
                "calibration": None
                if calibration is None
                else {
                    "num_samples": calibration.num_samples,
                    "seq_len": calibration.seq_len,
                    "text_path": _text(calibration.text_path),
                    "dataset": list(calibration.dataset) if calibration.dataset else None,
                    "dataset_commit": calibration.dataset_commit,
                },
            },
            "eval_samples": self.eval_samples,
            "eval_seq_len": self.eval_seq_len,
            "eval_text_path": _text(self.eval_text_path),
            "throughput_tokens": self.throughput_tokens,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        fields = dict(data)
        spec = dict(fields["quantization"])
        if spec.get("calibration"):
            calibration = dict(spec["calibration"])
            dataset = calibration.get("dataset")
            spec["calibration"] = CalibrationSpec(
                num_samples=calibration["num_samples"],
                seq_len=calibration["seq_len"],
                text_path=_path(calibration.get("text_path")),
                dataset=(dataset[0], dataset[1], dataset[2]) if dataset else None,
                dataset_commit=str(calibration.get("dataset_commit", "")),
            )
        fields.update(
            source_dir=Path(fields["source_dir"]),
            out_dir=Path(fields["out_dir"]),
            quantization=QuantizationSpec(**spec),
            eval_text_path=_path(fields.get("eval_text_path")),
        )
        return cls(**fields)


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def run(
    plan: Mapping[str, Any],
    emit: Emit,
    stop: threading.Event,
    quantizers: Mapping[str, Quantizer] | None = None,
) -> dict[str, Any]:
    """Quantize and measure; returns ``output_dir``, ``format``, ``size_bytes_before`` /
    ``_after`` and ``perplexity_*`` / ``tokens_per_second_*`` (``None`` where not measured)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = Plan.from_dict(plan)
    quantizer, spec = resolve(default_quantizers() if quantizers is None else quantizers, job.quantization)

    def step(phase: str, progress: float) -> None:
        if stop.is_set():
            raise Cancelled
        emit({"kind": "step", "phase": phase, "progress": progress})

    tokenizer: Any = AutoTokenizer.from_pretrained(job.source_dir)
    windows = None
    if job.eval_samples:
        texts = evaluate.heldout_texts(path=job.eval_text_path)
        windows = evaluate.token_windows(tokenizer, texts, job.eval_samples, job.eval_seq_len)
    calibration = None
    if spec.calibration is not None:  # GPTQ/AWQ: text disjoint from the evaluation's
        step("calibrate", CALIBRATE)
        calibration = calibration_windows(
            tokenizer,
            spec.calibration,
            context_length=getattr(tokenizer, "model_max_length", None),
            eval_text_path=job.eval_text_path,
            eval_tokens=job.eval_samples * job.eval_seq_len,
        )
    tokens = job.throughput_tokens or None
    step("evaluate", EVALUATE_BEFORE)
    before = evaluate.Measurement()
    if windows or tokens:
        source: Any = AutoModelForCausalLM.from_pretrained(job.source_dir)
        before = evaluate.measure(source.eval(), tokenizer, windows, tokens)
        del source
    step("quantize", QUANTIZE)
    artifact = quantizer.quantize(
        job.source_dir,
        job.out_dir,
        spec,
        calibration=calibration,
        progress=lambda fraction: step("quantize", QUANTIZE + QUANTIZE_SHARE * fraction),
    )
    step("evaluate", EVALUATE_AFTER)
    after = evaluate.Measurement()
    # a method whose eval model is dequantized floats (GPTQ/AWQ) has its speed not measured
    after_tokens = tokens if quantizer.measures_speed else None
    if windows or after_tokens:
        after = evaluate.measure(quantizer.load_for_eval(job.out_dir), tokenizer, windows, after_tokens)
    if stop.is_set():
        raise Cancelled
    return {
        "output_dir": str(job.out_dir),
        "format": artifact.format,
        "size_bytes_before": weight_bytes(job.source_dir),
        "size_bytes_after": artifact.size_bytes,
        "perplexity_before": before.perplexity,
        "perplexity_after": after.perplexity,
        "tokens_per_second_before": before.tokens_per_second,
        "tokens_per_second_after": after.tokens_per_second,
    }
