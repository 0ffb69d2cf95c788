"""The ``lmtrain`` command line: parse, load the config, call one library function, report.

This module stays thin on purpose. Each command turns its options into a ``Config`` and hands it
to one function of the library; the library returns a result, which is printed here. Every
``LmtrainError`` (a mistake the user can fix) becomes one line on stderr and exit code 2; any
other exception is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from lmtrain import __version__
from lmtrain.errors import LmtrainError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Train small causal language models end to end: tokenize, shard, train, sample.",
)

EXIT_USER_ERROR = 2

ConfigOption = typer.Option(
    None, "--config", "-c", help="YAML config of the run (default: the embedded default config)."
)
SetOption = typer.Option(
    None, "--set", "-s", metavar="SECTION.KEY=VALUE",
    help="Override one config value, e.g. --set tokenizer.vocab_size=4096 (repeatable).",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"lmtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    # Third-party libraries are chatty at INFO; keep the console for our own messages.
    for noisy in ("datasets", "huggingface_hub", "fsspec", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(func: Callable) -> Callable:
    """Turn an ``LmtrainError`` into one line on stderr and exit code 2; Ctrl-C into 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LmtrainError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _load(config: Optional[Path], overrides: Optional[List[str]]):
    from lmtrain.config import load_config

    return load_config(config, overrides or [])


@app.command()
@user_errors
def tokenize(
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer of this run."),
) -> None:
    """Train the run's byte-level BPE tokenizer on the training split of data.source."""
    from lmtrain.tokenizer import train_tokenizer

    cfg = _load(config, set_)
    stats = train_tokenizer(cfg, force=force)
    bpt = f"{stats.bytes_per_token:.3f}" if stats.bytes_per_token is not None else "n/a"
    typer.echo(
        f"tokenizer: vocab {stats.vocab_size}, {bpt} bytes/token on {stats.measured_on}, "
        f"{stats.documents} documents ({stats.utf8_bytes / 1e6:.1f} MB) in {stats.train_seconds:.1f}s\n"
        f"wrote {stats.path}"
    )


@app.command()
@user_errors
def shard(
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    force: bool = typer.Option(False, "--force", help="Rebuild the shards even if they are up to date."),
    verify: bool = typer.Option(False, "--verify", help="Re-read every shard and check it against the manifest."),
) -> None:
    """Encode the corpus into binary train/val token shards under RUN_DIR/data."""
    from lmtrain import shards

    cfg = _load(config, set_)
    if verify:
        from lmtrain.rundir import data_dir, tokenizer_path
        from lmtrain.fsutil import sha256_file

        tok = tokenizer_path(cfg.run_dir)
        result = shards.verify_shards(data_dir(cfg.run_dir), sha256_file(tok) if tok.exists() else None)
        typer.echo(f"verified {result.shards} shards, {result.tokens:,} tokens, "
                   f"{result.bytes_read / 1e6:.1f} MB: all match the manifest")
        return
    result = shards.build_shards(cfg, force=force)
    splits = result.splits
    if result.up_to_date:
        typer.echo(f"shards are up to date in {result.data_dir} "
                   f"(train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,}); "
                   "--force rebuilds them")
        return
    typer.echo(
        f"shards: train {splits['train']['tokens']:,} tokens in {splits['train']['shards']} shard(s), "
        f"val {splits['val']['tokens']:,} tokens in {splits['val']['shards']} shard(s); "
        f"{result.bytes_per_token:.3f} bytes/token; {result.seconds:.1f}s, "
        f"{result.tokens_per_sec / 1e6:.2f}M tokens/s\n"
        f"wrote {result.data_dir}"
    )


@app.command()
@user_errors
def train(
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    restart: bool = typer.Option(False, "--restart", help="Start over; old checkpoints and TensorBoard logs are moved aside."),
) -> None:
    """Train the GPT on the run's shards; resumes from the latest checkpoint if there is one."""
    from lmtrain.train import TrainingInterrupted, train as run_training

    cfg = _load(config, set_)
    try:
        result = run_training(cfg, restart=restart)
    except TrainingInterrupted as stop:
        where = f"checkpoint {stop.checkpoint}" if stop.checkpoint else "no checkpoint"
        typer.echo(f"stopped at step {stop.step}; wrote {where}\n"
                   f"resume with: {_resume_hint(config, set_)}", err=True)
        raise typer.Exit(128 + stop.signum) from None
    if result.already_done:
        typer.echo(f"training is already complete: step {result.step} of {result.max_steps} "
                   f"(raise train.max_steps to train longer, or --restart)")
        return
    bpb = f"{result.val_bpb:.4f}" if result.val_bpb is not None else "n/a"
    loss = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    typer.echo(
        f"trained to step {result.step} of {result.max_steps}"
        f"{' (time budget reached)' if result.stopped_by == 'max_minutes' else ''} in {result.seconds:.0f}s, "
        f"{result.tokens_per_sec:,.0f} tokens/s; val loss {loss}, val bpb {bpb}\n"
        f"checkpoint {result.checkpoint}\n"
        f"tensorboard --logdir {result.run_dir / 'tb'}"
    )


def _resume_hint(config: Optional[Path], overrides: Optional[List[str]]) -> str:
    parts = ["lmtrain train"]
    if config is not None:
        parts += ["--config", str(config)]
    for item in overrides or []:
        parts += ["--set", item if " " not in item else repr(item)]
    return " ".join(parts)


def main() -> None:
    app(prog_name="lmtrain")


if __name__ == "__main__":
    main()
