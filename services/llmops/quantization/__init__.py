"""Quantization: turn a model folder into a smaller one and measure what it cost.

``methods`` holds one :class:`~llmops.quantization.methods.base.Quantizer` per method (INT8 dynamic,
INT8 weight-only, INT4 weight-only with groups, GPTQ and AWQ calibrated 4-bit in vLLM's checkpoint
layouts, GGUF export), ``formats`` names the layouts of our own (INT8 dynamic, quanto INT4) and
loads them for serving's transformers engine, ``calibration`` cuts their calibration text (read at a
data-repository revision where asked) into token windows, ``evaluate`` measures size, perplexity
and tokens/s before and after, ``worker`` is the job body that does all that in a Ray worker (or a
thread) through the runners of :mod:`llmops.common.runners`, ``service`` keeps the job book and
supervises the workers, and ``llmops.common.artifacts.sinks`` hands a finished result to the registry or a
folder.
"""
