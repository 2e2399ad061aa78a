"""Checks on a submitted spec and the resolution of every default into a :class:`WorkerPlan`.

Everything here runs at submission, before any compute: a bad value is ``INVALID_ARGUMENT`` naming
its field; something this server cannot do (QLoRA or FP16 without a GPU, a chat dataset for a model
without a chat template) is ``FAILED_PRECONDITION`` saying why, never silently trained another way.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from llmops.common.errors import FailedPrecondition, InvalidArgument
from llmops.training.domain import DataFormat, LoraPlan, Precision, TrainingSpec, WorkerPlan

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_MODULE = re.compile(r"^[A-Za-z0-9_.]{1,128}$")
HP = "spec.hyperparameters"
MAX_TAGS = 64
MAX_ALIASES = 16
#: Data-parallel workers one job may ask for.
MAX_WORKERS = 512


def check_spec(spec: TrainingSpec) -> None:
    """Field checks that need nothing but the spec."""
    if not spec.base_name:
        raise InvalidArgument("a model name is required", field="spec.base_model.name")
    if spec.method == "sft" and spec.lora is not None:
        raise InvalidArgument("SFT trains every weight; use LORA for an adapter", field="spec.lora")
    if spec.method in ("lora", "qlora") and spec.lora is None:
        raise InvalidArgument(f"{spec.method.upper()} needs a lora config", field="spec.lora")
    if spec.num_workers < 0:
        raise InvalidArgument("must be >= 0", field="spec.num_workers")
    if spec.num_workers > MAX_WORKERS:
        raise InvalidArgument(f"at most {MAX_WORKERS}", field="spec.num_workers")
    if spec.output_model_name and not _NAME.match(spec.output_model_name):
        raise InvalidArgument("1-128 characters from [a-z0-9._-]", field="spec.output_model_name")
    if len(spec.aliases) > MAX_ALIASES:
        raise InvalidArgument(f"at most {MAX_ALIASES} aliases", field="spec.aliases")
    for alias in spec.aliases:
        if not _NAME.match(alias) or alias == "latest":
            raise InvalidArgument(f"{alias!r} is not a valid alias", field="spec.aliases")
    if spec.aliases and not spec.register:
        raise InvalidArgument("aliases need register", field="spec.aliases")
    if len(spec.tags) > MAX_TAGS or any(
        len(k.encode()) > 128 or len(v.encode()) > 1024 or not k for k, v in spec.tags.items()
    ):
        raise InvalidArgument(f"at most {MAX_TAGS} tags; keys 1-128 bytes, values <= 1024", field="spec.tags")
    if len(spec.description.encode()) > 4096:
        raise InvalidArgument("at most 4096 bytes", field="spec.description")
    resources = spec.resources
    if any(v < 0 or not math.isfinite(v) for v in (resources.cpus, resources.gpus, resources.memory_bytes)):
        raise InvalidArgument("must be >= 0", field="spec.resources")
    _check_hyperparameters(spec)
    if spec.lora is not None:
        lora = spec.lora
        if lora.r < 0 or lora.r > 1024:
            raise InvalidArgument("must be in [0, 1024]", field="spec.lora.r")
        if lora.alpha < 0:
            raise InvalidArgument("must be >= 0", field="spec.lora.alpha")
        if lora.dropout is not None and not 0 <= lora.dropout < 1:
            raise InvalidArgument("must be in [0, 1)", field="spec.lora.dropout")
        for module in lora.target_modules:
            if not _MODULE.match(module):
                raise InvalidArgument(f"{module!r} is not a module name", field="spec.lora.target_modules")


def _check_hyperparameters(spec: TrainingSpec) -> None:
    hp = spec.hyperparameters
    finite = (hp.learning_rate, hp.weight_decay, hp.max_grad_norm, hp.eval_split, hp.dpo_beta)
    if not all(math.isfinite(v) for v in finite) or (
        hp.num_epochs is not None and not math.isfinite(hp.num_epochs)
    ):
        raise InvalidArgument("numbers must be finite", field=HP)
    checks: list[tuple[bool, str, str]] = [
        (hp.num_epochs is None or hp.num_epochs > 0, "num_epochs", "must be > 0"),
        (hp.max_steps is None or hp.max_steps >= 1, "max_steps", "must be >= 1"),
        (0 <= hp.per_device_batch_size <= 4096, "per_device_batch_size", "must be in [0, 4096]"),
        (0 <= hp.gradient_accumulation_steps <= 4096, "gradient_accumulation_steps", "must be in [0, 4096]"),
        (0 <= hp.learning_rate <= 1, "learning_rate", "must be in [0, 1]"),
        (hp.warmup_steps is None or hp.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
        (hp.warmup_ratio is None or 0 <= hp.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
        (hp.weight_decay >= 0, "weight_decay", "must be >= 0"),
        (hp.max_grad_norm >= 0, "max_grad_norm", "must be >= 0"),
        (0 <= hp.max_seq_length <= 1 << 20, "max_seq_length", "must be in [0, 1048576]"),
        (0 <= hp.eval_split <= 0.5, "eval_split", "must be in [0, 0.5]"),
        (hp.eval_every_steps >= 0, "eval_every_steps", "must be >= 0"),
        (hp.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0"),
        (hp.logging_every_steps >= 0, "logging_every_steps", "must be >= 0"),
        (hp.dpo_beta >= 0, "dpo_beta", "must be >= 0"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise InvalidArgument(message, field=f"{HP}.{name}")
    if hp.dpo_beta and spec.method != "dpo":
        raise InvalidArgument("only for DPO", field=f"{HP}.dpo_beta")


def check_base_model(base_dir: Path, data_format: DataFormat) -> int:
    """Refuse a base the job cannot train; returns the model's context length (0 when unknown)."""
    if (base_dir / "adapter_config.json").is_file():
        raise FailedPrecondition("the base model is a LoRA adapter; train on a full model version")
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise FailedPrecondition("the base model has no readable config.json") from None
    if config.get("quantization_config"):
        raise FailedPrecondition("the base model is quantized; train on its unquantized parent")
    if data_format == "chat" and not _has_chat_template(base_dir):
        raise FailedPrecondition("chat data needs a base model whose tokenizer has a chat template")
    context = config.get("max_position_embeddings")
    return int(context) if isinstance(context, int) else 0


def _has_chat_template(base_dir: Path) -> bool:
    if (base_dir / "chat_template.jinja").is_file() or (base_dir / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((base_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def resolve_precision(spec: TrainingSpec, *, cuda: bool, bf16: bool) -> Precision:
    requested = spec.hyperparameters.precision
    if spec.method == "qlora" and not cuda:
        raise FailedPrecondition(
            "QLoRA loads the base in 4-bit NF4 through bitsandbytes, which needs a CUDA GPU; this "
            "server's workers have none. Use LORA, or run on a GPU cluster."
        )
    if requested == "fp16" and not cuda:
        raise FailedPrecondition("FP16 mixed precision needs a CUDA GPU; use BF16 or FP32 on a CPU")
    if requested == "bf16" and cuda and not bf16:
        raise FailedPrecondition("this GPU has no BF16; use FP16 or FP32")
    if requested is not None:
        return requested
    if cuda:
        return "bf16" if bf16 else "fp16"
    return "fp32"


def build_plan(
    spec: TrainingSpec,
    *,
    job_id: str,
    data_format: DataFormat,
    base_dir: Path,
    dataset_file: Path,
    job_dir: Path,
    context_length: int,
    cuda: bool,
    bf16: bool,
) -> WorkerPlan:
    """Every default of the spec resolved (the proto's documented defaults)."""
    hp = spec.hyperparameters
    adapter = spec.method in ("lora", "qlora") or (spec.method == "dpo" and spec.lora is not None)
    lora = None
    if adapter:
        given = spec.lora
        assert given is not None
        r = given.r or 8
        lora = LoraPlan(
            r=r,
            alpha=given.alpha or 2 * r,
            dropout=0.05 if given.dropout is None else given.dropout,
            target_modules=given.target_modules or ("all-linear",),
            merge_adapter=given.merge_adapter,
        )
    max_seq = hp.max_seq_length or min(1024, context_length or 1024)
    if context_length and max_seq > context_length:
        raise InvalidArgument(
            f"must be at most the model's context length {context_length}", field=f"{HP}.max_seq_length"
        )
    return WorkerPlan(
        job_id=job_id,
        method=spec.method,
        data_format=data_format,
        base_dir=str(base_dir),
        dataset_file=str(dataset_file),
        checkpoint_dir=str(job_dir / "checkpoints"),
        output_dir=str(job_dir / "output"),
        num_epochs=hp.num_epochs if hp.num_epochs is not None else 1.0,
        max_steps=hp.max_steps or -1,
        batch_size=hp.per_device_batch_size or 8,
        gradient_accumulation_steps=hp.gradient_accumulation_steps or 1,
        learning_rate=hp.learning_rate or (2e-4 if adapter else 2e-5),
        lr_scheduler=hp.lr_scheduler,
        warmup_steps=hp.warmup_steps or 0,
        warmup_ratio=hp.warmup_ratio or 0.0,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm or 1.0,
        max_seq_length=max_seq,
        precision=resolve_precision(spec, cuda=cuda, bf16=bf16),
        gradient_checkpointing=hp.gradient_checkpointing,
        seed=42 if hp.seed is None else hp.seed,
        eval_split=hp.eval_split,
        eval_every_steps=hp.eval_every_steps,
        checkpoint_every_steps=hp.checkpoint_every_steps,
        logging_every_steps=hp.logging_every_steps or 10,
        dpo_beta=hp.dpo_beta or 0.1,
        device="cuda" if cuda else "cpu",
        lora=lora,
        num_workers=max(1, spec.num_workers),
    )
