"""Training: fine-tuning jobs (SFT, LoRA, QLoRA, DPO) run on Ray, tracked in MLflow, registered.

``service`` keeps the job book (queue, events, cancellation, resume after a lost worker or a
restart), ``runners`` start job bodies (the shared :mod:`llmops.common.runners`: a Ray actor per
attempt; threads in tests), ``worker`` is the body (transformers + peft + trl), ``data`` reads and
checks the DVC-versioned dataset, and ``tracking`` logs each job to an MLflow run.
"""
