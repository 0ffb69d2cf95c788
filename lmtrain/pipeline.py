"""`lmtrain run`: tokenize, shard, train and sample one config, skipping what is already done.

Each stage is the same library call its own command makes; ``run_pipeline`` only decides which
ones still have work: a tokenizer that exists is kept, shards whose manifest matches are kept,
training resumes from its latest checkpoint (or is already complete), and a sample is drawn at
the end. Progress is reported through a callback, so the library prints nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lmtrain.config import Config
from lmtrain.errors import LmtrainError
from lmtrain.rundir import tokenizer_path


@dataclass
class PipelineResult:
    tokenizer: str  # "trained" or "kept"
    shards: str  # "built" or "up to date"
    train: object  # TrainResult
    sample: str
    val_bpb: float | None
    unigram_bpb: float | None


def run_pipeline(config: Config, report: Callable[[str, str], None] = lambda stage, msg: None,
                 on_sample_text: Callable[[str], None] = lambda text: None) -> PipelineResult:
    from lmtrain.lora import check_config as check_lora
    from lmtrain.pretrained import resolve
    from lmtrain.rundir import hold_run_dir

    config = resolve(config)
    check_lora(config, sharded=False)  # what needs the source's architecture, before any stage writes
    if config.train.eval_tasks:
        from lmtrain.errors import ConfigError
        from lmtrain.tasks import read_tasks

        try:
            read_tasks(config.train.eval_tasks, config.train.eval_tasks_limit)
        except LmtrainError as exc:
            raise ConfigError(f"train.eval_tasks: {exc}") from None
    with hold_run_dir(config.run_dir, "run"):
        return _run_pipeline(config, report, on_sample_text)


def _run_pipeline(config: Config, report: Callable[[str, str], None],
                  on_sample_text: Callable[[str], None]) -> PipelineResult:
    from lmtrain.tokenizer import check_tokenizer_agrees
    from lmtrain.sample import SampleOptions, sample
    from lmtrain.prepare import build_shards, train_tokenizer
    from lmtrain.train import train

    run_dir = config.run_dir
    if tokenizer_path(run_dir).exists():
        # Retraining it would silently invalidate the run's shards and checkpoints.
        check_tokenizer_agrees(config)
        tokenizer_state = "kept"
        report("tokenize", f"tokenizer present in {tokenizer_path(run_dir).parent}; skipped")
    else:
        stats = train_tokenizer(config)
        tokenizer_state = "trained"
        if stats.copied_from:
            report("tokenize", f"taken from model.init_from ({stats.copied_from}), vocab {stats.vocab_size}")
        else:
            report("tokenize", f"vocab {stats.vocab_size}, {stats.bytes_per_token or 0:.3f} bytes/token, "
                               f"{stats.documents} documents in {stats.train_seconds:.1f}s")

    shards = build_shards(config)
    splits = shards.splits
    if shards.up_to_date:
        report("shard", f"shards up to date (train {splits['train'].tokens:,} tokens, "
                        f"val {splits['val'].tokens:,}); skipped")
    else:
        report("shard", f"train {splits['train'].tokens:,} tokens, val {splits['val'].tokens:,} tokens "
                        f"in {shards.seconds:.1f}s")

    result = train(config)
    if result.already_done:
        report("train", f"training complete at step {result.step}; skipped")
    else:
        what = f"resumed from {result.resumed_from}" if result.resumed_from else "trained"
        report("train", f"{what} to step {result.step} in {result.seconds:.0f}s, "
                        f"{result.tokens_per_sec:,.0f} tokens/s")
        if result.budget is not None:
            from lmtrain.budget import spent

            report("train", spent(result.budget, result.step, result.tokens_seen, result.train_seconds,
                                  result.eval_seconds, result.checkpoint_seconds))

    report("sample", f"prompt {config.sample.prompt!r}")
    if result.best_step is not None and result.best_step != result.step:
        report("train", f"the best evaluation was at step {result.best_step} (val bpb {result.best_val_bpb:.4f}, the "
                        f"last {result.val_bpb:.4f}): checkpoints/best is what sample, eval and export read")
    stats = sample(run_dir, SampleOptions(checkpoint="best"), on_text=lambda i, piece: on_sample_text(piece))
    return PipelineResult(tokenizer_state, "up to date" if shards.up_to_date else "built", result,
                          stats.samples[0] if stats.samples else "",
                          result.best_val_bpb if result.best_val_bpb is not None else result.val_bpb,
                          shards.manifest.unigram_byte_bpb())
