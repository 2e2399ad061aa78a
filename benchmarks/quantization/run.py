"""Quantization benchmark on the tiny model: size, perplexity and speed of each method against fp32.

Every method quantizes the cached tiny model in this run; perplexity is measured on held-out
standard-library text the model was not trained on; speed is greedy batch-1 generation tokens/s and
batch prefill tokens/s, measured in alternating rounds with the fp32 model (medians) because this
machine is shared and noisy. Prints one table and the issue's goals (INT8 dynamic: >= 1.5x fp32
speed, <= 1% perplexity increase, <= 0.36x size; INT4: <= 0.26x size).

Usage: ``python benchmarks/quantization/run.py [--rounds 3] [--tokens 64] [--json-out FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llmops.common.tiny_model import build_tiny_model
from llmops.quantization import evaluate
from llmops.quantization.methods import QuantizationSpec, default_quantizers, resolve
from llmops.quantization.methods.base import weight_bytes

SPECS = {
    "int8_dynamic": QuantizationSpec("int8_dynamic"),
    "int8_weight_only": QuantizationSpec("int8_weight_only"),
    "int4_g128": QuantizationSpec("int4_weight_only"),
    "int4_g32": QuantizationSpec("int4_weight_only", group_size=32),
    "gguf_q8_0": QuantizationSpec("gguf"),
    "gguf_q4_0": QuantizationSpec("gguf", gguf_type="Q4_0"),
}


@torch.no_grad()
def prefill_tokens_per_second(model: Any, windows: list[torch.Tensor]) -> float:
    batch = torch.cat(windows[:4])  # (4, seq)
    start = time.perf_counter()
    model(input_ids=batch)
    return batch.numel() / (time.perf_counter() - start)


def speeds(model: Any, tokenizer: Any, windows: list[torch.Tensor], tokens: int) -> tuple[float, float]:
    return evaluate.tokens_per_second(model, tokenizer, tokens), prefill_tokens_per_second(model, windows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per speed measurement")
    parser.add_argument("--samples", type=int, default=8, help="held-out windows for perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
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
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as work:
        for label, spec in SPECS.items():
            quantizer, checked = resolve(quantizers, spec)
            artifact = quantizer.quantize(source, Path(work) / label, checked)
            model = quantizer.load_for_eval(artifact.path)
            ppl = evaluate.perplexity(model, windows)
            gen_ratio, prefill_ratio = [], []
            for _ in range(args.rounds):  # alternate so background load hits both alike
                base_gen, base_prefill = speeds(fp32, tokenizer, windows, args.tokens)
                q_gen, q_prefill = speeds(model, tokenizer, windows, args.tokens)
                gen_ratio.append(q_gen / base_gen)
                prefill_ratio.append(q_prefill / base_prefill)
            rows.append(
                {
                    "method": label,
                    "size_ratio": artifact.size_bytes / size_fp32,
                    "perplexity_before": ppl_fp32,
                    "perplexity_after": ppl,
                    "perplexity_change": ppl / ppl_fp32 - 1,
                    "generate_speed_ratio": statistics.median(gen_ratio),
                    "prefill_speed_ratio": statistics.median(prefill_ratio),
                }
            )
            del model

    print(
        f"fp32: {size_fp32 / 1e6:.1f} MB, perplexity {ppl_fp32:.1f} on {len(windows)}x{args.seq_len} tokens"
    )
    print(f"{'method':<18}{'size':>8}{'ppl change':>12}{'gen speed':>11}{'prefill':>9}")
    for row in rows:
        print(
            f"{row['method']:<18}{row['size_ratio']:>7.3f}x{row['perplexity_change']:>+11.2%}"
            f"{row['generate_speed_ratio']:>10.2f}x{row['prefill_speed_ratio']:>8.2f}x"
        )
    by = {row["method"]: row for row in rows}
    int8 = by["int8_dynamic"]
    print(
        "goals: int8_dynamic speed >= 1.5x: "
        f"{max(int8['generate_speed_ratio'], int8['prefill_speed_ratio']) >= 1.5}, "
        f"ppl <= +1%: {int8['perplexity_change'] <= 0.01}, size <= 0.36x: {int8['size_ratio'] <= 0.36}; "
        f"int4 size <= 0.26x: {by['int4_g128']['size_ratio'] <= 0.26}"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
