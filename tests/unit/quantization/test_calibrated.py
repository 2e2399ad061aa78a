"""GPTQ and AWQ (our own implementations): 4-bit packing round-trips in both checkpoint layouts,
GPTQ beats plain rounding on the calibration activations, AWQ's chosen scales never do worse than
no scaling and folding them keeps the float model's function, jobs without calibration are
INVALID_ARGUMENT, and the written folders load back with perplexity close to the fp32 source's.

Whether vLLM loads the folders is checked by hand, not here (the suite shares one vLLM engine).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from llmops.common.artifacts.sinks import LocalDirectorySink
from llmops.common.errors import InvalidArgument, NotFound
from llmops.common.jobs import JobState
from llmops.quantization import evaluate
from llmops.quantization.calibration import calibration_windows
from llmops.quantization.dispatch import Dispatcher
from llmops.quantization.domain import EvalSpec, JobSpec
from llmops.quantization.methods import (
    CalibrationSpec,
    QuantizationSpec,
    QuantizedArtifact,
    default_quantizers,
    resolve,
)
from llmops.quantization.methods.awq import AwqQuantizer, InputStats, group_error, search_scales
from llmops.quantization.methods.base import weight_bytes
from llmops.quantization.methods.gptq import gptq_quantize
from llmops.quantization.methods.wna16 import (
    AWQ_ORDER,
    BLOCK_LINEARS,
    QuantizedWeight,
    grid_params,
    pack_awq,
    pack_gptq,
    pack_int4,
    quantize_codes,
    rtn_quantize,
    unpack_awq,
    unpack_gptq,
    unpack_int4,
)
from llmops.quantization.service import QuantizationService

CALIBRATION = CalibrationSpec(num_samples=8, seq_len=256)


def _random_quantized(out_features: int, in_features: int, group_size: int, seed: int = 0) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    return QuantizedWeight(
        codes=torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.int32),
        scales=(torch.rand(out_features, groups, generator=generator) + 0.01).half().float(),
        zeros=torch.randint(0, 16, (out_features, groups), generator=generator, dtype=torch.int32),
        group_size=group_size,
    )


def _correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Activations with a decaying spectrum and a few large channels, like a transformer's."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(features, features, generator=generator)
    spectrum = torch.logspace(0, -2, features)
    x = torch.randn(rows, features, generator=generator) @ (basis * spectrum.unsqueeze(1))
    x[:, :4] *= 20
    return x


# packing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [tuple(range(8)), AWQ_ORDER], ids=["gptq", "awq"])
def test_pack_then_unpack_gives_the_codes(order: tuple[int, ...]) -> None:
    codes = torch.randint(0, 16, (24, 64), dtype=torch.int32)
    packed = pack_int4(codes, order)
    assert packed.dtype == torch.int32 and packed.shape == (24, 8)
    assert torch.equal(unpack_int4(packed, order), codes)


def test_bit_layouts_are_the_ones_vllm_reads() -> None:
    values = torch.arange(8, dtype=torch.int32).unsqueeze(0)  # value c at position c
    # GPTQ: value i in bits 4i.  AWQ: nibble p holds channel AWQ_ORDER[p] = 0, 2, 4, 6, 1, 3, 5, 7.
    assert int(pack_int4(values)) == 0x76543210
    assert int(pack_int4(values, AWQ_ORDER)) == 0x75316420
    high = torch.full((1, 8), 15, dtype=torch.int32)
    assert int(pack_int4(high)) == -1  # all bits set, stored as a signed int32


@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_gptq_and_awq_layouts_round_trip(group_size: int) -> None:
    weight = _random_quantized(64, 256, group_size)
    gptq = pack_gptq(weight)
    assert gptq["qweight"].shape == (32, 64) and gptq["qzeros"].shape == (256 // group_size, 8)
    assert gptq["scales"].dtype == torch.float16 and gptq["g_idx"].tolist() == [
        i // group_size for i in range(256)
    ]
    awq = pack_awq(weight)
    assert awq["qweight"].shape == (256, 8) and awq["qzeros"].shape == (256 // group_size, 8)
    for back in (unpack_gptq(gptq), unpack_awq(awq)):
        assert torch.equal(back.codes, weight.codes) and torch.equal(back.zeros, weight.zeros)
        assert torch.equal(back.scales, weight.scales) and back.group_size == group_size
        assert torch.equal(back.dequantize(), weight.dequantize())


def test_round_to_nearest_stays_on_the_grid() -> None:
    weight = torch.randn(16, 256)
    for sym in (False, True):
        quantized = rtn_quantize(weight, 64, sym=sym)
        assert quantized.codes.min() >= 0 and quantized.codes.max() <= 15
        assert torch.equal(quantized.scales, quantized.scales.half().float())
        step = quantized.scales.repeat_interleave(64, dim=1)
        assert ((quantized.dequantize() - weight).abs() <= step * 0.51 + 1e-6).float().mean() > 0.99


# the algorithms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("group_size", "sym"), [(128, True), (128, False), (-1, True), (32, True)])
def test_gptq_reconstructs_calibration_outputs_better_than_rounding(group_size: int, sym: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    x = _correlated_inputs(2048, 256)
    hessian = 2 * x.t() @ x / x.shape[0]
    reference = x @ linear.weight.detach().t()

    def error(quantized: QuantizedWeight) -> float:
        return float((x @ quantized.dequantize().t() - reference).pow(2).mean())

    gptq = gptq_quantize(linear.weight, hessian, group_size, sym=sym)
    rtn = rtn_quantize(linear.weight, group_size, sym=sym)
    assert gptq.codes.shape == rtn.codes.shape and gptq.scales.shape == rtn.scales.shape
    assert error(gptq) < 0.7 * error(rtn)


def _reference_gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """The reference implementation's loop (``fasterquant``, one rank-1 update per column), symmetric."""
    w = weight.clone()
    columns = w.shape[1]
    h = hessian.clone() + 0.01 * torch.mean(torch.diag(hessian)) * torch.eye(columns)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w, dtype=torch.int32)
    for i in range(columns):
        if i % group_size == 0:
            scale, zero = grid_params(w[:, i : i + group_size], sym=True)
        codes[:, i] = quantize_codes(w[:, i], scale, zero)
        error = (w[:, i] - (codes[:, i] - zero) * scale) / h_inv[i, i]
        w[:, i:] -= error.unsqueeze(1) @ h_inv[i, i:].unsqueeze(0)
    return codes


def test_gptq_matches_the_reference_column_loop() -> None:
    torch.manual_seed(2)
    weight = torch.randn(48, 256)
    x = _correlated_inputs(1024, 256, seed=2)
    hessian = 2 * x.t() @ x / x.shape[0]
    ours = gptq_quantize(weight, hessian, 64).codes
    reference = _reference_gptq(weight, hessian, 64)
    assert (ours != reference).float().mean() < 0.002  # float summation order may flip a rounding


def test_awq_scales_never_increase_the_error_over_no_scaling() -> None:
    torch.manual_seed(1)
    weights = [torch.randn(128, 256) * 0.05, torch.randn(64, 256) * 0.05]
    x = _correlated_inputs(1024, 256, seed=1)
    stats = InputStats.of(x)
    search = search_scales(stats, weights, 128)
    unscaled = group_error(stats, weights, torch.ones(256), 128)
    chosen = group_error(stats, weights, search.scales, 128)
    assert search.losses[0] == pytest.approx(unscaled)  # alpha = 0 is no scaling
    assert chosen == min(search.losses) <= unscaled
    assert chosen < unscaled and search.alpha > 0  # the large channels make scaling pay
    # the error through the Gram matrix is the output error on the activations themselves
    weight = torch.cat(weights)
    scales = search.scales
    rounded = rtn_quantize(weight * scales, 128).dequantize() / scales
    direct = float((x @ rounded.t() - x @ weight.t()).pow(2).mean())
    assert chosen == pytest.approx(direct, rel=1e-3)


def test_awq_folding_keeps_the_float_model_equivalent() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # no grouped-query attention: o_proj folds into v_proj too
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.layers:  # non-trivial norms, so folding into them is exercised
            block.input_layernorm.weight.uniform_(0.5, 1.5)
            block.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    original = copy.deepcopy(model)
    windows = [torch.randint(0, 128, (1, 32)) for _ in range(4)]
    spec = QuantizationSpec("awq", bits=4, group_size=32)
    with torch.no_grad():
        quantized = AwqQuantizer()._quantize_model(model, windows, spec, lambda _: None)
        ids = torch.cat(windows)
        expected, folded = original(input_ids=ids).logits, model(input_ids=ids).logits
    assert sorted(quantized) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS)
    assert torch.allclose(folded, expected, atol=1e-4, rtol=1e-4)
    changed = (
        model.model.layers[0].self_attn.v_proj.weight != original.model.layers[0].self_attn.v_proj.weight
    )
    assert changed.any()  # the scales were applied, not skipped


# validation and jobs -------------------------------------------------------------------------------


class _HeldRunner(Dispatcher):
    def __init__(self) -> None:
        self.pending: list[Any] = []

    def submit(self, work: Any) -> None:
        self.pending.append(work)


def _service(tmp_path: Path, runner: Dispatcher) -> QuantizationService:
    return QuantizationService(
        default_quantizers(), LocalDirectorySink(tmp_path / "registry"), runner, tmp_path / "work"
    )


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_job_without_calibration_is_invalid_argument(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    service = _service(tmp_path, _HeldRunner())
    spec = JobSpec(source_dir=tiny_model_dir, source_name="tiny", quantization=QuantizationSpec(method))
    with pytest.raises(InvalidArgument) as caught:
        service.submit(spec)
    assert caught.value.field == "calibration" and "calibration" in caught.value.message
    assert service.list_jobs() == []
    with_calibration = QuantizationSpec(method, calibration=CalibrationSpec())
    job = service.submit(
        JobSpec(source_dir=tiny_model_dir, source_name="tiny", quantization=with_calibration)
    )
    checked = job.spec.quantization
    assert (checked.bits, checked.group_size) == (4, 128)
    assert checked.calibration == CalibrationSpec(num_samples=128, seq_len=512)


@pytest.mark.parametrize(
    ("calibration", "error", "field"),
    [
        (CalibrationSpec(num_samples=-1), InvalidArgument, "calibration"),
        (CalibrationSpec(num_samples=4096, seq_len=4096), InvalidArgument, "calibration"),
        (CalibrationSpec(text_path=Path("/nonexistent/calibration.txt")), NotFound, ""),
        (CalibrationSpec(dataset=("", "v1", "")), InvalidArgument, "calibration.ref.path"),
        (CalibrationSpec(dataset=("/abs/c.jsonl", "v1", "")), InvalidArgument, "calibration.ref.path"),
        (CalibrationSpec(dataset=("../c.jsonl", "", "repo")), InvalidArgument, "calibration.ref.path"),
    ],
)
def test_bad_calibration_is_rejected(
    calibration: CalibrationSpec, error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as caught:
        resolve(default_quantizers(), QuantizationSpec("gptq", calibration=calibration))
    assert getattr(caught.value, "field", "") == field


def test_other_methods_ignore_calibration() -> None:
    _, checked = resolve(default_quantizers(), QuantizationSpec("int4_weight_only", calibration=CALIBRATION))
    assert checked.calibration is None


def test_calibration_windows_skip_the_evaluation_text(tokenizer: Any) -> None:
    eval_windows = evaluate.token_windows(tokenizer, evaluate.heldout_texts(max_chars=60_000), 4, 128)
    windows = calibration_windows(tokenizer, CalibrationSpec(num_samples=3, seq_len=128), eval_tokens=4 * 128)
    assert [w.shape for w in windows] == [(1, 128)] * 3
    assert not any(torch.equal(w, e) for w in windows for e in eval_windows)
    shorter = calibration_windows(tokenizer, CalibrationSpec(num_samples=2, seq_len=4096), context_length=256)
    assert [w.shape for w in shorter] == [(1, 256)] * 2


# whole-model results -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["gptq", "awq"])
def calibrated(
    request: pytest.FixtureRequest,
    tiny_model_dir: Path,
    tokenizer: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, QuantizedArtifact]:
    quantizer, checked = resolve(
        default_quantizers(), QuantizationSpec(request.param, calibration=CALIBRATION)
    )
    assert checked.calibration is not None
    windows = calibration_windows(tokenizer, checked.calibration, eval_tokens=4 * 128)
    fractions: list[float] = []
    out_dir = tmp_path_factory.mktemp(request.param) / "out"
    artifact = quantizer.quantize(tiny_model_dir, out_dir, checked, windows, progress=fractions.append)
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    return request.param, artifact


def test_folder_is_the_standard_layout(
    calibrated: tuple[str, QuantizedArtifact], tiny_model_dir: Path
) -> None:
    from safetensors import safe_open

    method, artifact = calibrated
    config = json.loads((artifact.path / "config.json").read_text())
    settings = config["quantization_config"]
    assert config["dtype"] == "float16" and settings["bits"] == 4 and settings["group_size"] == 128
    if method == "gptq":
        assert (
            settings["quant_method"] == "gptq" and settings["desc_act"] is False and settings["sym"] is True
        )
    else:
        assert settings["quant_method"] == "awq" and settings["zero_point"] is True
        assert settings["version"] == "gemm"
    with safe_open(str(artifact.path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        q = "model.layers.0.mlp.down_proj"  # 1024 -> 384
        assert f"{q}.weight" not in names
        qweight, scales = f.get_tensor(f"{q}.qweight"), f.get_tensor(f"{q}.scales")
        assert qweight.dtype == torch.int32 and scales.dtype == torch.float16
        assert qweight.shape == ((128, 384) if method == "gptq" else (1024, 48))
        assert scales.shape == (8, 384) and f.get_tensor(f"{q}.qzeros").shape == (8, 48)
        assert (f"{q}.g_idx" in names) == (method == "gptq")
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            assert f.get_tensor(name).dtype == torch.float16
    assert artifact.format == "int4" and artifact.settings["calibration_samples"] == 8
    assert artifact.size_bytes / weight_bytes(tiny_model_dir) < 0.26
    assert (artifact.path / "tokenizer.json").is_file()


def test_folder_loads_back_with_perplexity_near_fp32(
    calibrated: tuple[str, QuantizedArtifact],
    heldout_windows: list[torch.Tensor],
    fp32_perplexity: float,
) -> None:
    method, artifact = calibrated
    model = default_quantizers()[method].load_for_eval(artifact.path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    perplexity = evaluate.perplexity(model, heldout_windows)
    assert math.isfinite(perplexity) and perplexity < 1.1 * fp32_perplexity


def test_a_gptq_job_calibrates_records_lineage_and_leaves_speed_unmeasured(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    texts = evaluate.heldout_texts(max_chars=200_000)[-6:]
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    runner = _HeldRunner()
    service = _service(tmp_path, runner)
    calibration = CalibrationSpec(num_samples=4, seq_len=128, text_path=data, dataset=(str(data), "", ""))
    job = service.submit(
        JobSpec(
            source_dir=tiny_model_dir,
            source_name="tiny",
            source_version=1,
            quantization=QuantizationSpec("gptq", calibration=calibration),
            eval=EvalSpec(num_samples=2, seq_len=64, throughput_tokens=4),
        )
    )
    runner.pending.pop()()
    done = service.get(job.id)
    assert done.state is JobState.SUCCEEDED, done.error_message
    assert "calibrate" in [e.phase for e in done.events]
    result = done.result
    assert result is not None and result.format == "int4" and result.size_ratio < 0.26
    assert result.perplexity_after is not None and math.isfinite(result.perplexity_after)
    assert result.tokens_per_second_before is not None and result.tokens_per_second_after is None
    record = json.loads((tmp_path / "registry" / "tiny-gptq" / "1" / "version.json").read_text())
    assert record["dataset"] == [str(data), "", ""] and record["format"] == "int4"
    assert record["tags"]["quantization_method"] == "gptq"


def test_the_proto_calibration_sample_becomes_the_spec() -> None:
    from llmops.proto.common.v1 import dataset_pb2
    from llmops.proto.quantization.v1 import quantization_service_pb2 as pb
    from llmops.quantization.grpc_app import _calibration

    assert _calibration(pb.QuantizationJobSpec(method=pb.QUANTIZATION_METHOD_GPTQ)) is None
    default = pb.QuantizationJobSpec(calibration=pb.DatasetSample(num_samples=16))
    assert _calibration(default) == CalibrationSpec(num_samples=16)
    uri = pb.QuantizationJobSpec(
        calibration=pb.DatasetSample(
            ref=dataset_pb2.DatasetRef(path="file:///data/my%20text.jsonl"), seq_len=64
        )
    )
    assert _calibration(uri) == CalibrationSpec(
        seq_len=64,
        text_path=Path("/data/my text.jsonl"),
        dataset=("file:///data/my%20text.jsonl", "", ""),
    )
