"""A spec is checked in full before compute is spent, and every default resolves as documented.

Invariants: each bad value is INVALID_ARGUMENT naming its field; what this server cannot do (QLoRA
or FP16 without CUDA, BF16 on a GPU without it, an adapter or quantized base, chat data for a model
without a chat template) is FAILED_PRECONDITION saying why, never trained another way; zero means
the default the proto documents (batch 8, LR 2e-4 for adapters and 2e-5 for full weights, LoRA r 8
/ alpha 2r / dropout 0.05 / all-linear, max_seq_length min(1024, context), ...) while an explicit
zero seed or dropout is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from llmops.common.errors import FailedPrecondition, InvalidArgument
from llmops.training.domain import DatasetRef, Hyperparameters, LoraPlan, LoraSpec, Resources, TrainingSpec
from llmops.training.validation import build_plan, check_base_model, check_spec, resolve_precision


def _spec(method: Any = "lora", **fields: Any) -> TrainingSpec:
    fields.setdefault("lora", LoraSpec() if method in ("lora", "qlora") else None)
    fields.setdefault("base_name", "tiny")
    return TrainingSpec(dataset=DatasetRef("data/sft.jsonl"), method=method, **fields)


def _hp(**values: Any) -> dict[str, Any]:
    return {"hyperparameters": Hyperparameters(**values)}


def test_a_plain_spec_passes() -> None:
    for method in ("sft", "lora", "qlora", "dpo"):
        check_spec(_spec(method))
    check_spec(
        _spec(
            "dpo",
            lora=LoraSpec(r=16, alpha=32, dropout=0.0, target_modules=("q_proj", "model.v_proj")),
            output_model_name="tiny-dpo.v2_x",
            aliases=("challenger",),
            tags={"team": "ml"},
            resources=Resources(cpus=2, gpus=1, memory_bytes=1 << 30),
            num_workers=1,
            **_hp(num_epochs=0.5, warmup_ratio=0.1, eval_split=0.5, dpo_beta=0.2, seed=-3),
        )
    )


HP = "spec.hyperparameters"
BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("sft", {"base_name": ""}, "spec.base_model.name"),
    ("sft", {"lora": LoraSpec()}, "spec.lora"),
    ("lora", {"lora": None}, "spec.lora"),
    ("qlora", {"lora": None}, "spec.lora"),
    ("sft", {"num_workers": -1}, "spec.num_workers"),
    ("sft", {"num_workers": 513}, "spec.num_workers"),
    ("sft", {"output_model_name": "Tiny"}, "spec.output_model_name"),
    ("sft", {"output_model_name": "-tiny"}, "spec.output_model_name"),
    ("sft", {"output_model_name": "a" * 129}, "spec.output_model_name"),
    ("sft", {"aliases": ("latest",)}, "spec.aliases"),
    ("sft", {"aliases": ("Champion",)}, "spec.aliases"),
    ("sft", {"aliases": ("champion",), "register": False}, "spec.aliases"),
    ("sft", {"tags": {"": "x"}}, "spec.tags"),
    ("sft", {"tags": {"k": "v" * 1025}}, "spec.tags"),
    ("sft", {"tags": {"k" * 129: "v"}}, "spec.tags"),
    ("sft", {"tags": {f"k{i}": "v" for i in range(65)}}, "spec.tags"),
    ("sft", {"description": "é" * 2049}, "spec.description"),
    ("sft", {"resources": Resources(cpus=-1)}, "spec.resources"),
    ("sft", {"resources": Resources(gpus=math.inf)}, "spec.resources"),
    ("sft", {"resources": Resources(memory_bytes=-1)}, "spec.resources"),
    ("sft", _hp(learning_rate=math.nan), HP),
    ("sft", _hp(num_epochs=math.inf), HP),
    ("sft", _hp(num_epochs=0), f"{HP}.num_epochs"),
    ("sft", _hp(max_steps=0), f"{HP}.max_steps"),
    ("sft", _hp(per_device_batch_size=-1), f"{HP}.per_device_batch_size"),
    ("sft", _hp(per_device_batch_size=4097), f"{HP}.per_device_batch_size"),
    ("sft", _hp(gradient_accumulation_steps=-1), f"{HP}.gradient_accumulation_steps"),
    ("sft", _hp(learning_rate=-1e-5), f"{HP}.learning_rate"),
    ("sft", _hp(learning_rate=1.5), f"{HP}.learning_rate"),
    ("sft", _hp(warmup_steps=-1), f"{HP}.warmup_steps"),
    ("sft", _hp(warmup_ratio=1.0), f"{HP}.warmup_ratio"),
    ("sft", _hp(weight_decay=-0.1), f"{HP}.weight_decay"),
    ("sft", _hp(max_grad_norm=-1), f"{HP}.max_grad_norm"),
    ("sft", _hp(max_seq_length=-1), f"{HP}.max_seq_length"),
    ("sft", _hp(max_seq_length=(1 << 20) + 1), f"{HP}.max_seq_length"),
    ("sft", _hp(eval_split=0.6), f"{HP}.eval_split"),
    ("sft", _hp(eval_split=-0.1), f"{HP}.eval_split"),
    ("sft", _hp(eval_every_steps=-1), f"{HP}.eval_every_steps"),
    ("sft", _hp(checkpoint_every_steps=-1), f"{HP}.checkpoint_every_steps"),
    ("sft", _hp(logging_every_steps=-1), f"{HP}.logging_every_steps"),
    ("dpo", _hp(dpo_beta=-0.1), f"{HP}.dpo_beta"),
    ("lora", _hp(dpo_beta=0.1), f"{HP}.dpo_beta"),
    ("lora", {"lora": LoraSpec(r=-1)}, "spec.lora.r"),
    ("lora", {"lora": LoraSpec(r=1025)}, "spec.lora.r"),
    ("lora", {"lora": LoraSpec(alpha=-1)}, "spec.lora.alpha"),
    ("lora", {"lora": LoraSpec(dropout=1.0)}, "spec.lora.dropout"),
    ("lora", {"lora": LoraSpec(dropout=-0.1)}, "spec.lora.dropout"),
    ("lora", {"lora": LoraSpec(target_modules=("q_proj", "v proj"))}, "spec.lora.target_modules"),
    ("lora", {"lora": LoraSpec(target_modules=("",))}, "spec.lora.target_modules"),
]


@pytest.mark.parametrize(("method", "fields", "field"), BAD_SPECS)
def test_a_bad_value_is_refused_naming_its_field(method: Any, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_spec(_spec(method, **fields))
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")


# precision ----------------------------------------------------------------------------------------


def test_qlora_needs_cuda() -> None:
    with pytest.raises(FailedPrecondition, match="CUDA"):
        resolve_precision(_spec("qlora"), cuda=False, bf16=False)
    assert resolve_precision(_spec("qlora"), cuda=True, bf16=True) == "bf16"


def test_fp16_is_refused_on_cpu_and_bf16_on_a_gpu_without_it() -> None:
    with pytest.raises(FailedPrecondition, match="CUDA"):
        resolve_precision(_spec(**_hp(precision="fp16")), cuda=False, bf16=False)
    with pytest.raises(FailedPrecondition, match="BF16"):
        resolve_precision(_spec(**_hp(precision="bf16")), cuda=True, bf16=False)


@pytest.mark.parametrize(
    ("requested", "cuda", "bf16", "expected"),
    [
        (None, False, False, "fp32"),
        (None, True, True, "bf16"),
        (None, True, False, "fp16"),
        ("fp32", True, True, "fp32"),
        ("bf16", False, False, "bf16"),
        ("fp16", True, True, "fp16"),
    ],
)
def test_precision_defaults_to_what_the_hardware_does_best(
    requested: Any, cuda: bool, bf16: bool, expected: str
) -> None:
    assert resolve_precision(_spec(**_hp(precision=requested)), cuda=cuda, bf16=bf16) == expected


# plan ---------------------------------------------------------------------------------------------


def _plan(spec: TrainingSpec, tmp_path: Path, context_length: int = 2048, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"cuda": False, "bf16": False, **kwargs}
    return build_plan(
        spec,
        job_id="tj-1",
        data_format="prompt_completion",
        base_dir=tmp_path / "base",
        dataset_file=tmp_path / "job" / "dataset.jsonl",
        job_dir=tmp_path / "job",
        context_length=context_length,
        **options,
    )


def test_lora_defaults_resolve_as_documented(tmp_path: Path) -> None:
    plan = _plan(_spec("lora"), tmp_path)
    assert plan.lora == LoraPlan(
        r=8, alpha=16, dropout=0.05, target_modules=("all-linear",), merge_adapter=False
    )
    assert plan.registers_adapter
    expected = {
        "job_id": "tj-1",
        "method": "lora",
        "data_format": "prompt_completion",
        "base_dir": str(tmp_path / "base"),
        "dataset_file": str(tmp_path / "job" / "dataset.jsonl"),
        "checkpoint_dir": str(tmp_path / "job" / "checkpoints"),
        "output_dir": str(tmp_path / "job" / "output"),
        "num_epochs": 1.0,
        "max_steps": -1,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4,
        "lr_scheduler": "cosine",
        "warmup_steps": 0,
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_seq_length": 1024,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "seed": 42,
        "eval_split": 0.0,
        "eval_every_steps": 0,
        "checkpoint_every_steps": 0,
        "logging_every_steps": 10,
        "dpo_beta": 0.1,
        "device": "cpu",
        "resume_from": None,
        "num_workers": 1,
    }
    assert {k: v for k, v in plan.to_dict().items() if k != "lora"} == expected


def test_full_weight_methods_default_to_a_lower_learning_rate(tmp_path: Path) -> None:
    sft = _plan(_spec("sft"), tmp_path)
    assert sft.learning_rate == 2e-5 and sft.lora is None and not sft.trains_adapter
    dpo = _plan(_spec("dpo"), tmp_path)
    assert dpo.learning_rate == 2e-5 and dpo.lora is None and dpo.dpo_beta == 0.1
    dpo_lora = _plan(_spec("dpo", lora=LoraSpec(r=4)), tmp_path)
    assert dpo_lora.learning_rate == 2e-4 and dpo_lora.lora is not None and dpo_lora.lora.alpha == 8


@pytest.mark.parametrize(("context", "expected"), [(128, 128), (1024, 1024), (4096, 1024), (0, 1024)])
def test_max_seq_length_defaults_to_the_smaller_of_1024_and_the_context(context: int, expected: int) -> None:
    assert _plan(_spec(), Path("/x"), context_length=context).max_seq_length == expected


def test_max_seq_length_above_the_context_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="context length 128") as caught:
        _plan(_spec(**_hp(max_seq_length=129)), tmp_path, context_length=128)
    assert caught.value.field == "spec.hyperparameters.max_seq_length"
    assert _plan(_spec(**_hp(max_seq_length=128)), tmp_path, context_length=128).max_seq_length == 128
    # an unknown context length does not cap it
    assert _plan(_spec(**_hp(max_seq_length=4096)), tmp_path, context_length=0).max_seq_length == 4096


def test_given_values_are_kept_including_explicit_zeros(tmp_path: Path) -> None:
    hp = Hyperparameters(
        max_steps=7,
        per_device_batch_size=2,
        gradient_accumulation_steps=3,
        learning_rate=1e-3,
        lr_scheduler="linear",
        warmup_steps=5,
        weight_decay=0.01,
        max_grad_norm=0.5,
        max_seq_length=64,
        precision="bf16",
        gradient_checkpointing=True,
        seed=0,
        eval_split=0.25,
        eval_every_steps=2,
        checkpoint_every_steps=3,
        logging_every_steps=1,
    )
    lora = LoraSpec(r=4, alpha=4, dropout=0.0, target_modules=("q_proj",), merge_adapter=True)
    plan = _plan(_spec("lora", hyperparameters=hp, lora=lora), tmp_path, cuda=True, bf16=True)
    assert (plan.max_steps, plan.batch_size, plan.gradient_accumulation_steps) == (7, 2, 3)
    assert (plan.learning_rate, plan.lr_scheduler, plan.warmup_steps) == (1e-3, "linear", 5)
    assert (plan.weight_decay, plan.max_grad_norm, plan.max_seq_length) == (0.01, 0.5, 64)
    assert (plan.precision, plan.device, plan.gradient_checkpointing) == ("bf16", "cuda", True)
    assert plan.seed == 0
    assert (plan.eval_split, plan.eval_every_steps, plan.checkpoint_every_steps) == (0.25, 2, 3)
    assert plan.logging_every_steps == 1
    assert plan.lora == LoraPlan(r=4, alpha=4, dropout=0.0, target_modules=("q_proj",), merge_adapter=True)
    assert plan.trains_adapter and not plan.registers_adapter
    ratio = _plan(_spec(**_hp(num_epochs=2.5, warmup_ratio=0.1)), tmp_path)
    assert (ratio.num_epochs, ratio.max_steps, ratio.warmup_ratio, ratio.warmup_steps) == (2.5, -1, 0.1, 0)


def test_the_plan_refuses_what_the_hardware_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="CUDA"):
        _plan(_spec("qlora"), tmp_path)


def test_a_plan_survives_a_round_trip_through_a_dict(tmp_path: Path) -> None:
    from llmops.training.domain import WorkerPlan

    plan = dataclasses.replace(_plan(_spec("lora"), tmp_path), resume_from="/x/checkpoint-4")
    assert WorkerPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


# base model ---------------------------------------------------------------------------------------


def _base(tmp_path: Path, config: dict[str, Any] | None = None, **files: Any) -> Path:
    folder = tmp_path / "base"
    folder.mkdir(exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (folder / name.replace("__", ".")).write_text(
            content if isinstance(content, str) else json.dumps(content)
        )
    return folder


LLAMA = {"model_type": "llama", "max_position_embeddings": 128}


def test_a_full_model_returns_its_context_length(tmp_path: Path) -> None:
    assert check_base_model(_base(tmp_path, LLAMA), "prompt_completion") == 128
    assert check_base_model(_base(tmp_path, {"model_type": "llama"}), "text") == 0


def test_an_adapter_is_not_a_base(tmp_path: Path) -> None:
    folder = _base(tmp_path, LLAMA, adapter_config__json={"peft_type": "LORA", "r": 8})
    with pytest.raises(FailedPrecondition, match="adapter"):
        check_base_model(folder, "text")


def test_a_quantized_model_is_not_a_base(tmp_path: Path) -> None:
    config = {**LLAMA, "quantization_config": {"quant_method": "torchao"}}
    with pytest.raises(FailedPrecondition, match="quantized"):
        check_base_model(_base(tmp_path, config), "text")


def test_a_folder_without_a_readable_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"config\.json"):
        check_base_model(_base(tmp_path), "text")
    with pytest.raises(FailedPrecondition, match=r"config\.json"):
        check_base_model(_base(tmp_path, None, config__json="{not json"), "text")


def test_chat_data_needs_a_chat_template(tmp_path: Path) -> None:
    plain = _base(tmp_path, LLAMA, tokenizer_config__json={"model_max_length": 128})
    with pytest.raises(FailedPrecondition, match="chat template"):
        check_base_model(plain, "chat")
    assert check_base_model(plain, "prompt_completion") == 128  # other formats need none


@pytest.mark.parametrize(
    "files",
    [
        {"tokenizer_config__json": {"chat_template": "{{ messages }}"}},
        {"chat_template__jinja": "{{ messages }}"},
        {"chat_template__json": {"chat_template": "{{ messages }}"}},
    ],
)
def test_a_chat_template_in_any_of_its_files_is_found(tmp_path: Path, files: dict[str, Any]) -> None:
    assert check_base_model(_base(tmp_path, LLAMA, **files), "chat") == 128
