"""Tiny Llama-architecture model and tokenizer, built offline from the Python standard library.

No model hub is reachable, so tests, benchmarks and the demo build their model here: a byte-level
BPE tokenizer trained on a sorted selection of the stdlib's ``.py`` files, a ~12.6M-parameter
``LlamaForCausalLM`` trained briefly on the same text, and a chat template, saved in Hugging Face
layout (loadable with ``from_pretrained(dir)`` and by vLLM). Builds are cached in a folder named by a
content hash of (spec, factory version, corpus file list); a second call returns at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

#: Bump whenever a change here alters what gets built: it is part of the cache key.
FACTORY_VERSION = "1"
CACHE_ENV_VAR = "LLMOPS_TINY_MODEL_CACHE"
MARKER_FILE = "tiny_model.json"
BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", END)
SPECIAL_TOKENS = (BOS, EOS, PAD, *CHAT_MARKERS)
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests"})
CorpusFile = tuple[Path, str, int]  # (path, name relative to the stdlib, size in bytes)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Everything that decides the built model; all fields are part of the cache key."""

    vocab_size: int = 4096
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 1024
    max_position: int = 2048
    train_steps: int = 60
    seq_len: int = 64
    batch_size: int = 8
    lr: float = 5e-3
    #: Training windows come from the corpus's first ``train_tokens`` tokens: a small pool lets a few
    #: dozen CPU steps learn some structure instead of only token frequencies.
    train_tokens: int = 16384
    seed: int = 0
    corpus_bytes: int = 2_000_000
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        problems = []
        if self.vocab_size % 64 or self.vocab_size < 512:
            problems.append("vocab_size must be a multiple of 64 (vLLM pads otherwise) and >= 512")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            problems.append("hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if not 0 < self.seq_len < min(self.max_position, self.train_tokens):
            problems.append("seq_len must be positive and below max_position and train_tokens")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append("dtype must be 'float32' or 'bfloat16'")
        if problems:
            raise ValueError(f"invalid TinyModelSpec: {'; '.join(problems)}")


DEFAULT_SPEC = TinyModelSpec()


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """A built model folder (Hugging Face layout) and what its build measured."""

    path: Path
    spec: TinyModelSpec
    parameter_count: int
    initial_loss: float  # loss on one fixed batch of training windows, before training
    final_loss: float  # the same batch, after training
    content_hash: str


def default_cache_dir() -> Path:
    """Cache root: ``$LLMOPS_TINY_MODEL_CACHE`` if set, else ``~/.cache/llmops/tiny-models``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured) if configured else Path.home() / ".cache" / "llmops" / "tiny-models"


def corpus_files(corpus_bytes: int) -> list[CorpusFile]:
    """Stdlib ``.py`` files in sorted walk order, until their sizes add up to ``corpus_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    selected: list[CorpusFile] = []
    total = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder) / name
            selected.append((path, path.relative_to(root).as_posix(), path.stat().st_size))
            total += selected[-1][2]
            if total >= corpus_bytes:
                return selected
    return selected


def _locate(spec: TinyModelSpec, cache_dir: Path | None) -> tuple[Path, str, list[CorpusFile]]:
    files = corpus_files(spec.corpus_bytes)
    key = {
        "factory_version": FACTORY_VERSION,
        "spec": dataclasses.asdict(spec),
        "corpus": [[name, size] for _, name, size in files],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir or default_cache_dir()) / f"llama-{digest[:16]}", digest, files


def tiny_model_path(spec: TinyModelSpec | None = None, cache_dir: Path | None = None) -> Path:
    """Folder that ``build_tiny_model(spec, cache_dir)`` uses, built or not."""
    return _locate(spec or DEFAULT_SPEC, cache_dir)[0]


def build_tiny_model(
    spec: TinyModelSpec | None = None, cache_dir: Path | None = None, progress: bool = False
) -> TinyModel:
    """Return the tiny model for ``spec``, building it first unless the cache already has it.

    Safe across processes: builders of one spec take turns on a lock file, a build goes to a
    temporary folder beside the target and is moved in with ``os.replace``, and the marker file is
    written last, so a folder with a marker is complete.

    Args:
        spec: What to build; ``DEFAULT_SPEC`` when omitted.
        cache_dir: Cache root; ``default_cache_dir()`` (read now, not at import) when omitted.
        progress: Show a rich progress bar over the training steps.
    """
    spec = spec or DEFAULT_SPEC
    target, digest, files = _locate(spec, cache_dir)
    if (found := _read_marker(target)) is not None:
        return found
    target.parent.mkdir(parents=True, exist_ok=True)
    import fcntl  # POSIX only, like every machine this platform runs on

    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (found := _read_marker(target)) is not None:  # another process finished it meanwhile
            return found
        shutil.rmtree(target, ignore_errors=True)  # leftovers without a marker are not trusted
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            _build_into(staging, spec, files, digest, progress)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if (built := _read_marker(target)) is None:
        raise RuntimeError(f"tiny model built but {target / MARKER_FILE} is unreadable")
    return built


def _read_marker(folder: Path) -> TinyModel | None:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    measured = {k: marker[k] for k in ("parameter_count", "initial_loss", "final_loss", "content_hash")}
    return TinyModel(path=folder, spec=TinyModelSpec(**marker["spec"]), **measured)


def _build_into(
    folder: Path, spec: TinyModelSpec, files: Sequence[CorpusFile], digest: str, progress: bool
) -> None:
    import tokenizers
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    texts = [path.read_bytes().decode("utf-8", errors="replace") for path, _, _ in files]
    tokenizer = _train_tokenizer(texts, spec)
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(cpus, 8)))  # more threads than this only add overhead here
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
            torch.manual_seed(spec.seed)
            model, losses = _train_model(texts, tokenizer, spec, progress)
    finally:
        torch.set_num_threads(previous_threads)

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Writing model shards" bar on every build
    try:
        model.to(getattr(torch, spec.dtype)).save_pretrained(folder)  # safetensors: v5's only format
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    tokenizer.save_pretrained(folder, save_jinja_files=False)  # template inside tokenizer_config
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": CHAT_MARKERS,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    marker = {
        "factory_version": FACTORY_VERSION,
        "content_hash": digest,
        "spec": dataclasses.asdict(spec),
        "parameter_count": sum(p.numel() for p in model.parameters()),
        **losses,
        "corpus": {"files": len(files), "bytes": sum(size for _, _, size in files)},
        "versions": {lib.__name__: lib.__version__ for lib in (torch, transformers, tokenizers)},
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    folder.chmod(0o755)  # mkdtemp made it private; a cache may be shared (a mounted volume)
    for file in folder.iterdir():
        file.chmod(0o644)
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")  # last: marks it complete


def _train_tokenizer(texts: Sequence[str], spec: TinyModelSpec) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(CHAT_MARKERS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position,
        clean_up_tokenization_spaces=False,
    )


def _train_model(
    texts: Sequence[str], tokenizer: Any, spec: TinyModelSpec, progress: bool
) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    bos, eos, pad, end = (tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD, END))
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype=spec.dtype,
    )
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]  # float32 while training; cast to spec.dtype when saved
    # A chat turn ends with <|end|>, a document with <|eos|>: generation stops at either.
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=bos, eos_token_id=[eos, end], pad_token_id=pad, do_sample=False
    )

    stream: list[int] = []  # documents joined by <|eos|>, cut to the training pool
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(texts)):
        stream.extend([*encoding.ids, eos])
        if len(stream) >= spec.train_tokens:
            break
    pool = torch.tensor(stream[: spec.train_tokens])  # (train_tokens,)
    generator = torch.Generator().manual_seed(spec.seed)

    def windows(count: int) -> torch.Tensor:  # (count, seq_len)
        starts = torch.randint(0, len(pool) - spec.seq_len, (count,), generator=generator)
        return torch.stack([pool[s : s + spec.seq_len] for s in starts.tolist()])

    def loss_on(batch: torch.Tensor) -> float:
        model.eval()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            loss: float = model(input_ids=batch, labels=batch).loss.item()
        model.train()
        return loss

    fixed_batch = windows(2 * spec.batch_size)  # the same batch before and after: comparable
    initial = loss_on(fixed_batch)
    logger.info("tiny model: %d parameters, initial loss %.3f", model.num_parameters(), initial)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95))
    warmup = max(1, spec.train_steps // 10)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10%
        done = (step - warmup) / max(1, spec.train_steps - warmup)
        return (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * done))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    step_losses: list[float] = []
    with _progress_bar(progress, spec.train_steps) as advance:
        model.train()
        for step in range(spec.train_steps):
            batch = windows(spec.batch_size)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(round(loss.item(), 4))
            advance(step_losses[-1])
            if step % 10 == 0 or step == spec.train_steps - 1:
                logger.info("tiny model step %d/%d: loss %.3f", step + 1, spec.train_steps, step_losses[-1])
    final = loss_on(fixed_batch)
    logger.info("tiny model: fixed-batch loss %.3f -> %.3f", initial, final)
    model.eval()  # type: ignore[no-untyped-call]
    return model, {"initial_loss": initial, "final_loss": final, "train_losses": step_losses}


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[float], None]]:
    """Yield ``advance(loss)``: a rich progress bar when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("training tiny model", total=total)
        yield lambda loss: bar.update(task, advance=1, description=f"training tiny model (loss {loss:.3f})")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llmops.common.tiny_model [--out DIR]``: build (or find) it and print its folder."""
    parser = argparse.ArgumentParser(description="Build (or find in the cache) the tiny test model.")
    parser.add_argument(
        "--out", type=Path, help=f"cache root (default: ${CACHE_ENV_VAR}, else ~/.cache/llmops/tiny-models)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=DEFAULT_SPEC.dtype)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    spec = dataclasses.replace(DEFAULT_SPEC, dtype=args.dtype)
    print(build_tiny_model(spec, cache_dir=args.out, progress=not args.no_progress).path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
