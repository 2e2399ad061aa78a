"""The body of a training job: what runs in the worker process (a Ray actor, or a thread in tests).

``train(plan, emit, stop)`` loads the base model and the job's dataset snapshot, trains it with the
maintained libraries (``transformers.Trainer`` through trl's ``SFTTrainer`` / ``DPOTrainer``, peft
for LoRA and QLoRA), and writes the result to ``plan.output_dir``: a PEFT adapter, or full weights
(trained, or LoRA merged into the base), with the tokenizer. It reports through ``emit`` (plain
dicts, see :class:`EventCallback`) and stops with :class:`Cancelled` soon after ``stop`` is set.
Checkpoints go to ``plan.checkpoint_dir`` (``checkpoint-<step>/``, complete once
``trainer_state.json`` exists); ``plan.resume_from`` restarts from one.

SFT data is tokenized here rather than by trl, so the loss mask is exact for every format: the whole
text for ``text``; only the completion for ``prompt_completion``; only assistant turns (their
content and end marker, not the role header) for ``chat``.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from llmops.common.runners.base import Cancelled as Cancelled  # re-exported: what bodies raise
from llmops.common.runners.base import Emit
from llmops.training.checkpoints import is_complete
from llmops.training.data import read_rows
from llmops.training.domain import WorkerPlan

#: Checkpoints kept on disk; older ones are deleted as new ones are written.
KEEP_CHECKPOINTS = 2


def tokenize_sft(plan: WorkerPlan, tokenizer: Any, rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``assistant_masks`` (1 where the loss applies), truncated to the plan's length."""
    eos = tokenizer.eos_token_id
    examples = []
    for row in rows:
        if plan.data_format == "text":
            ids = tokenizer(row["text"])["input_ids"] + [eos]
            mask = [1] * len(ids)
        elif plan.data_format == "prompt_completion":
            prompt = tokenizer(row["prompt"])["input_ids"] if row["prompt"] else []
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
            ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
        else:
            ids, mask = _tokenize_chat(tokenizer, row["messages"])
        ids, mask = ids[: plan.max_seq_length], mask[: plan.max_seq_length]
        if any(mask):
            examples.append({"input_ids": ids, "assistant_masks": mask})
    if not examples:
        raise ValueError("no example keeps a token to learn from after truncation to max_seq_length")
    return examples


def _tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Render turn by turn; an assistant turn's header is context, its content and end are targets."""

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0:
            return ""
        text: str = tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )
        return text

    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        pieces = []
        if message["role"] == "assistant":
            header = render(index, generation_prompt=True)
            pieces.append((header, 0))
        full = render(index + 1)
        pieces.append((full, 1 if message["role"] == "assistant" else 0))
        for text, target in pieces:
            if not text.startswith(rendered):
                raise ValueError("the chat template does not render turns as prefixes of each other")
            new = text[len(rendered) :]
            piece = tokenizer(new, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [target] * len(piece)
            rendered = text
    return ids, mask


class EventCallback(TrainerCallback):  # type: ignore[misc]
    """Turns trainer callbacks into job events and stops training when asked.

    Emits ``step`` (every ``logging_every_steps`` optimizer steps and the first: loss, learning
    rate, tokens/s since the previous step event, epoch, grad_norm...), ``eval`` (loss and
    perplexity) and ``checkpoint`` (after the folder is complete).
    """

    def __init__(self, emit: Emit, stop: threading.Event, checkpoint_dir: Path) -> None:
        self._emit = emit
        self._stop = stop
        self._checkpoint_dir = checkpoint_dir
        self._last_tokens = 0
        self._last_time = time.perf_counter()
        #: Step of the latest evaluation and its loss, so the end does not evaluate twice.
        self.last_eval: tuple[int, float] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self._last_time = time.perf_counter()
        self._emit(
            {
                "kind": "step",
                "phase": "train",
                "step": state.global_step,
                "total_steps": state.max_steps,
                "progress": state.global_step / state.max_steps if state.max_steps else 0.0,
                "epoch": float(state.epoch or 0.0),
            }
        )
        self._check()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check()

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        logs = dict(logs or {})
        if "loss" not in logs:  # the end-of-training summary and eval logs
            return
        now = time.perf_counter()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        rate = (tokens - self._last_tokens) / (now - self._last_time) if now > self._last_time else 0.0
        self._last_tokens, self._last_time = tokens, now
        extra = _interesting({k: v for k, v in logs.items() if k not in ("loss", "learning_rate")})
        self._emit(
            {
                "kind": "step",
                "phase": "train",
                "step": state.global_step,
                "total_steps": state.max_steps,
                "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "tokens_per_second": rate,
                "epoch": float(logs.get("epoch", state.epoch or 0.0)),
                "progress": state.global_step / state.max_steps if state.max_steps else 0.0,
                "metrics": extra,
            }
        )

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        metrics = dict(metrics or {})
        loss = float(metrics.get("eval_loss", math.nan))
        extra = _interesting({k.removeprefix("eval_"): v for k, v in metrics.items() if k != "eval_loss"})
        self.last_eval = (state.global_step, loss)
        self._emit(
            {
                "kind": "eval",
                "step": state.global_step,
                "loss": loss,
                "perplexity": math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan,
                "metrics": extra,
            }
        )
        self._check()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = self._checkpoint_dir / f"checkpoint-{state.global_step}"
        if is_complete(folder):
            self._emit({"kind": "checkpoint", "step": state.global_step, "uri": folder.resolve().as_uri()})
        self._check()

    def _check(self) -> None:
        if self._stop.is_set():
            raise Cancelled


#: Trainer log keys that describe the run's bookkeeping rather than the model.
_BOOKKEEPING = ("runtime", "per_second", "epoch", "num_tokens", "num_input_tokens", "total_flos")


def _interesting(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and math.isfinite(v) and not any(word in k for word in _BOOKKEEPING)
    }


def _training_args(plan: WorkerPlan, config_cls: Any, has_eval: bool, **extra: Any) -> Any:
    checkpoint_every = plan.checkpoint_every_steps
    eval_every = plan.eval_every_steps
    return config_cls(
        output_dir=plan.checkpoint_dir,
        num_train_epochs=plan.num_epochs,
        max_steps=plan.max_steps,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=plan.learning_rate,
        lr_scheduler_type=plan.lr_scheduler,
        warmup_steps=plan.warmup_ratio or plan.warmup_steps,
        weight_decay=plan.weight_decay,
        max_grad_norm=plan.max_grad_norm,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        gradient_checkpointing=plan.gradient_checkpointing,
        seed=plan.seed % (1 << 32),
        data_seed=plan.seed % (1 << 32),
        logging_steps=plan.logging_every_steps,
        logging_first_step=True,
        save_strategy="steps" if checkpoint_every else "epoch",
        save_steps=checkpoint_every or 500,
        save_total_limit=KEEP_CHECKPOINTS,
        eval_strategy=("steps" if eval_every else "epoch") if has_eval else "no",
        eval_steps=eval_every or None,
        report_to=[],
        use_cpu=plan.device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        # LoRA's frozen base weights are not unused parameters: skip DDP's extra graph traversal.
        ddp_find_unused_parameters=False if plan.num_workers > 1 else None,
        **extra,
    )


def _load_model(plan: WorkerPlan) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.precision]
    if plan.method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            plan.base_dir,
            quantization_config=quantization,
            dtype=dtype,
            # A data-parallel rank holds its own GPU (Ray Train sets LOCAL_RANK).
            device_map={"": int(os.environ.get("LOCAL_RANK", "0"))},
        )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)  # type: ignore[no-untyped-call]
    # Mixed precision keeps fp32 master weights; the autocast does the rest.
    return AutoModelForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32)


def _peft_config(plan: WorkerPlan) -> Any:
    if plan.lora is None:
        return None
    from peft import LoraConfig

    modules = plan.lora.target_modules
    return LoraConfig(
        r=plan.lora.r,
        lora_alpha=plan.lora.alpha,
        lora_dropout=plan.lora.dropout,
        target_modules="all-linear" if modules == ("all-linear",) else list(modules),
        task_type="CAUSAL_LM",
    )


def _split(dataset: Any, plan: WorkerPlan) -> tuple[Any, Any]:
    if not plan.eval_split:
        return dataset, None
    if len(dataset) < 2:
        raise ValueError("an eval split needs at least 2 examples")
    parts = dataset.train_test_split(test_size=plan.eval_split, seed=plan.seed % (1 << 32), shuffle=True)
    return parts["train"], parts["test"]


def preload() -> None:
    """Import what :func:`train` imports (seconds of torch, transformers, peft and trl), ahead of a job:
    a warm spare worker runs this while it waits for one."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]  # noqa: F401


def train(
    plan: WorkerPlan | Mapping[str, Any],
    emit: Emit,
    stop: threading.Event,
    *,
    callbacks: Sequence[Any] = (),
    exports: bool = True,
) -> dict[str, Any]:
    """Run the job to its end; returns ``output_dir``, ``format``, ``metrics``, ``parameter_count``.

    ``plan`` may come as its dict (``WorkerPlan.to_dict``), which is how a runner hands it over.
    A data-parallel rank (:mod:`llmops.training.distributed`) runs this same loop under Ray Train:
    ``callbacks`` join the trainer's (the checkpoint report to Ray Train's storage) and only the
    rank that ``exports`` writes the result (the others return ``step`` and ``metrics``).
    """
    import datasets
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer

    if not isinstance(plan, WorkerPlan):
        plan = WorkerPlan.from_dict(plan)

    datasets.disable_progress_bars()  # the job's events are its progress display
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    emit({"kind": "step", "phase": "load", "progress": 0.0})
    tokenizer = AutoTokenizer.from_pretrained(plan.base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = read_rows(Path(plan.dataset_file))
    if stop.is_set():
        raise Cancelled
    model = _load_model(plan)
    checkpoint_dir = Path(plan.checkpoint_dir)
    callback = EventCallback(emit, stop, checkpoint_dir)
    trainer: Any
    if plan.method == "dpo":
        from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

        train_set, eval_set = _split(Dataset.from_list(rows), plan)
        args = _training_args(
            plan, DPOConfig, eval_set is not None, beta=plan.dpo_beta, max_length=plan.max_seq_length
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=_peft_config(plan),
            callbacks=[callback, *callbacks],
        )
    else:
        from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

        train_set, eval_set = _split(Dataset.from_list(tokenize_sft(plan, tokenizer, rows)), plan)
        args = _training_args(plan, SFTConfig, eval_set is not None, max_length=plan.max_seq_length)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=_peft_config(plan),
            callbacks=[callback, *callbacks],
        )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # events carry the logs; stdout stays quiet
    output = trainer.train(resume_from_checkpoint=plan.resume_from)
    if stop.is_set():
        raise Cancelled
    metrics = _interesting(output.metrics)
    metrics.update(
        {
            k: float(output.metrics[k])
            for k in ("train_runtime", "train_samples_per_second")
            if k in output.metrics
        }
    )
    if eval_set is not None:
        if callback.last_eval is None or callback.last_eval[0] != trainer.state.global_step:
            trainer.evaluate()
        assert callback.last_eval is not None
        metrics["eval_loss"] = callback.last_eval[1]
        metrics["eval_perplexity"] = math.exp(min(callback.last_eval[1], 700.0))
    if not exports:
        return {"step": int(trainer.state.global_step), "metrics": metrics}
    emit({"kind": "step", "phase": "export", "step": trainer.state.global_step, "progress": 1.0})
    return _export(plan, trainer, tokenizer, metrics)


def _export(plan: WorkerPlan, trainer: Any, tokenizer: Any, metrics: dict[str, float]) -> dict[str, Any]:
    output_dir = Path(plan.output_dir)
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = trainer.model
    if plan.registers_adapter:
        model.save_pretrained(partial)
        trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        data_format = "adapter"
    else:
        if plan.lora is not None:  # merge LoRA into the base weights
            model = model.merge_and_unload()
        model.save_pretrained(partial)
        trainable = sum(p.numel() for p in model.parameters())
        data_format = "bf16" if str(getattr(model.config, "dtype", "")) == "torch.bfloat16" else "fp32"
    tokenizer.save_pretrained(partial)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(partial, output_dir)
    return {
        "output_dir": str(output_dir),
        "format": data_format,
        "metrics": metrics,
        "parameter_count": int(trainable),
        "step": int(trainer.state.global_step),
    }
