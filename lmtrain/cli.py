"""The ``lmtrain`` command line: parse, load the config, call one library function, report.

This module stays thin on purpose. Each command turns its options into a ``Config`` and hands it
to one function of the library; the library returns a result, which is printed here. Every
``LmtrainError`` (a mistake the user can fix) becomes one line on stderr and exit code 2; any
other exception is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
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
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}

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
        except OSError as exc:
            # The library names the file and what is intact wherever it writes an artifact; this
            # is the net for the rest (a log, an event file): the machine's fault, not ours.
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise
            from lmtrain.fsutil import describe_os_error

            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"error: {where}{describe_os_error(exc)}; the last complete checkpoint, shards and "
                       "tokenizer are intact", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _load(config: Optional[Path], overrides: Optional[List[str]]):
    from lmtrain.config import load_config

    return load_config(config, overrides or [])


def _rank0() -> bool:
    """This process reports (and holds the lock) for all: under torchrun, rank 0 alone."""
    return os.environ.get("RANK", "0") == "0"


def _writer(cfg, command: str):
    """The run directory's writer lock, taken here before the stage imports torch or datasets
    (seconds), so that a second writer is refused at once. The stage takes it again (re-entrant)
    for callers of the library; under torchrun only rank 0 holds it, as in the library."""
    from lmtrain.rundir import hold_run_dir

    return hold_run_dir(cfg.run_dir, command) if _rank0() else contextlib.nullcontext()


@app.command()
@user_errors
def tokenize(
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer of this run."),
) -> None:
    """Train the run's byte-level BPE tokenizer on the training split of data.source."""
    cfg = _load(config, set_)
    with _writer(cfg, "tokenize"):
        from lmtrain.prepare import train_tokenizer

        stats = train_tokenizer(cfg, force=force)
    if stats.copied_from:
        typer.echo(f"tokenizer: taken from model.init_from ({stats.copied_from}), vocab {stats.vocab_size}; "
                   f"nothing trained\nwrote {stats.path}")
        return
    bpt = f"{stats.bytes_per_token:.3f}" if stats.bytes_per_token is not None else "n/a"
    typer.echo(
        f"tokenizer: vocab {stats.vocab_size}, {bpt} bytes/token on {stats.measured_on}, "
        f"{stats.documents} documents ({stats.utf8_bytes / 1e6:.1f} MB) in {stats.train_seconds:.1f}s\n"
        f"wrote {stats.path}"
    )
    for moved in stats.moved_aside or []:
        typer.echo(f"moved aside: {moved}")


@app.command()
@user_errors
def shard(
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    force: bool = typer.Option(False, "--force", help="Rebuild the shards even if they are up to date."),
    verify: bool = typer.Option(False, "--verify", help="Re-read every shard and check it against the manifest."),
) -> None:
    """Encode the corpus into binary train/val token shards under RUN_DIR/data."""
    cfg = _load(config, set_)
    if verify:
        from lmtrain import shards
        from lmtrain.rundir import data_dir, tokenizer_path
        from lmtrain.fsutil import sha256_file

        tok = tokenizer_path(cfg.run_dir)
        result = shards.verify_shards(data_dir(cfg.run_dir), sha256_file(tok) if tok.exists() else None)
        typer.echo(f"verified {result.shards} shards, {result.tokens:,} tokens, "
                   f"{result.bytes_read / 1e6:.1f} MB: all match the manifest")
        return
    with _writer(cfg, "shard"):
        from lmtrain.prepare import build_shards

        result = build_shards(cfg, force=force)
    splits = result.splits
    if result.up_to_date:
        typer.echo(f"shards are up to date in {result.data_dir} "
                   f"(train {splits['train'].tokens:,} tokens, val {splits['val'].tokens:,}); "
                   "--force rebuilds them")
        return
    typer.echo(
        f"shards: train {splits['train'].tokens:,} tokens in {splits['train'].shards} shard(s), "
        f"val {splits['val'].tokens:,} tokens in {splits['val'].shards} shard(s); "
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
    cfg = _load(config, set_)
    with _writer(cfg, "train"):
        from lmtrain.train import TrainingInterrupted, train as run_training

        try:
            result = run_training(cfg, restart=restart)
        except TrainingInterrupted as stop:
            _stopped(stop, _resume_hint("train", config, set_))
    if not _rank0():
        return  # under torchrun rank 0 reports for all
    if result.already_done and result.stopped_by == "max_minutes":
        typer.echo(f"training is already complete: its time budget is spent ({result.train_seconds / 60:.1f} min "
                   f"of train.max_minutes {cfg.train.max_minutes:g}) at step {result.step}; raise "
                   "train.max_minutes to train longer, or --restart")
        return
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
        f"{_best_line(result)}"
        f"checkpoint {result.checkpoint}\n"
        f"tensorboard --logdir {result.run_dir / 'tb'}"
    )
    if result.budget is not None:
        from lmtrain.budget import spent

        typer.echo(spent(result.budget, result.step, result.tokens_seen, result.train_seconds, result.eval_seconds,
                         result.checkpoint_seconds))


RunOption = typer.Option(..., "--run", "-r", help="The run directory (run.dir of its config).")
TemperatureOption = typer.Option(None, "--temperature", "-t", help="Softmax temperature (0: greedy).")
TopKOption = typer.Option(None, "--top-k", help="Sample among the k most likely tokens.")
TopPOption = typer.Option(None, "--top-p", help="Nucleus sampling mass, in (0, 1].")
GreedyOption = typer.Option(False, "--greedy", help="Always take the most likely token.")
ReadRunOption = typer.Option(None, "--run", "-r", help="The run directory (run.dir of its config).")
ModelOption = typer.Option(None, "--model", help="Instead of --run: a model as it is (a Hugging Face directory, "
                           "an lmtrain run or checkpoint directory).")


def _run_or_model(run: Optional[Path], model: Optional[Path]) -> Path:
    """What a reader reads: ``--run`` or ``--model``, exactly one of them."""
    from lmtrain.errors import LmtrainError

    if (run is None) == (model is None):
        raise LmtrainError("give --run DIR (a run's checkpoint) or --model PATH (a model as it is), one of them")
    if model is not None and not model.exists():
        raise LmtrainError(f"--model {model}: no such file or directory")
    return run if run is not None else model
CheckpointOption = typer.Option("best", "--checkpoint", help="best (the lowest val loss, the default), latest, or a step-XXXXXXXX directory name.")
DeviceOption = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")


@app.command()
@user_errors
def sample(
    run: Optional[Path] = ReadRunOption,
    model: Optional[Path] = ModelOption,
    checkpoint: str = CheckpointOption,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue; '-' reads stdin."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a file ('-' for stdin)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Tokens per sample."),
    temperature: Optional[float] = TemperatureOption,
    top_k: Optional[int] = TopKOption,
    top_p: Optional[float] = TopPOption,
    greedy: bool = GreedyOption,
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="How many samples."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Same seed, same output (default: the config's)."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop at this text (repeatable)."),
    device: str = DeviceOption,
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole sequence per token (slow; for checks)."),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="On CUDA, decode eagerly instead of replaying a captured graph."),
    compile_step: bool = typer.Option(False, "--compile", help="Compile the one-token step: on a CPU ahead of time (about 10 s, then 2-2.5x faster decoding), on CUDA with torch.compile."),
) -> None:
    """Generate text from a checkpoint; text streams to stdout, statistics go to stderr."""
    from lmtrain.sample import SampleOptions, sample as run_sample

    run = _run_or_model(run, model)
    text = _read_prompt(prompt, prompt_file)
    options = SampleOptions(checkpoint=checkpoint, prompt=text, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                            num_samples=num_samples, seed=seed, stop=list(stop or []), device=device,
                            use_cache=not no_cache, cuda_graph=not no_cuda_graph,
                            compile=compile_step)
    current = {"index": -1}

    def on_text(index: int, piece: str) -> None:
        if index != current["index"]:  # a new sample: a separator, then its prompt
            if index > 0:
                sys.stdout.write(f"\n\n---------- sample {index + 1} ----------\n")
            current["index"] = index
            if text:
                sys.stdout.write(text)
        sys.stdout.write(piece)
        sys.stdout.flush()

    stats = run_sample(run, options, on_text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    typer.echo(f"[{stats.tokens} tokens in {stats.seconds:.2f}s, {stats.tokens_per_sec:,.1f} tokens/s, "
               f"{stats.checkpoint.name} on {stats.device}]", err=True)


def _best_line(result) -> str:
    """Which checkpoint sample, eval and export read (the best by val loss), when it is not the last."""
    if result.best_step is None or result.best_step == result.step or result.best_val_bpb is None:
        return ""
    return (f"best: step {result.best_step}, val loss {result.best_val_loss:.4f}, val bpb {result.best_val_bpb:.4f} "
            "(checkpoints/best: what sample, eval and export read; --checkpoint latest for the last)\n")


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> Optional[str]:
    from lmtrain.errors import LmtrainError

    if prompt is not None and prompt_file is not None:
        raise LmtrainError("give either --prompt or --prompt-file, not both")
    limit = 16 << 20  # bytes: a prompt is cut to the model's context anyway; /dev/zero must not fill memory
    if prompt == "-" or (prompt_file is not None and str(prompt_file) == "-"):
        text = sys.stdin.read(limit + 1)
    elif prompt_file is not None:
        try:
            with open(prompt_file, "rb") as f:
                text = f.read(limit + 1).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LmtrainError(f"cannot read --prompt-file {prompt_file}: {exc}") from None
    else:
        return prompt
    if len(text) > limit:
        raise LmtrainError(f"the prompt is longer than {limit >> 20} MB; lmtrain reads at most that much of it")
    return text


@app.command()
@user_errors
def chat(
    run: Optional[Path] = ReadRunOption,
    model: Optional[Path] = ModelOption,
    checkpoint: str = CheckpointOption,
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt; kept when old turns are dropped."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Most tokens per reply."),
    temperature: Optional[float] = TemperatureOption,
    top_k: Optional[int] = TopKOption,
    top_p: Optional[float] = TopPOption,
    greedy: bool = GreedyOption,
    seed: Optional[int] = typer.Option(None, "--seed", help="Same seed, same replies (default: the config's)."),
    device: str = DeviceOption,
) -> None:
    """Talk to a model in its own chat template; the conversation (and its cache) is kept.
    In a terminal: /reset, /exit. Piped: one message per input line, one reply per output line."""
    from lmtrain.chat import COMMANDS, ChatOptions, chat_loop, open_session

    run = _run_or_model(run, model)
    session = open_session(run, ChatOptions(checkpoint, system, max_new_tokens, temperature, top_k, top_p,
                                            greedy, seed, device))
    interactive = sys.stdin.isatty()

    def read() -> Optional[str]:
        if interactive:
            try:
                return input("you> ")
            except EOFError:
                return None
        line = sys.stdin.readline(1 << 20)
        return line or None

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def note(text: str) -> None:
        typer.echo(text, err=True)

    if interactive:
        note(f"chatting with {run} ({', '.join(f'{k}: {v}' for k, v in COMMANDS.items())})")
    chat_loop(session, read, write, note, interactive)


@app.command()
@user_errors
def serve(
    run: Optional[Path] = ReadRunOption,
    model: Optional[Path] = ModelOption,
    checkpoint: str = CheckpointOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMTRAIN_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (or set LMTRAIN_API_KEY)."),
    slots: int = typer.Option(8, "--batch", min=1, max=256, help="Requests decoded together, at most."),
    queue: int = typer.Option(32, "--queue", min=0, max=100000, help="Requests waiting for a slot, at most (then 503)."),
    context: Optional[int] = typer.Option(None, "--context", min=2, help="Tokens per request, prompt and reply (default: the model's, at most 4096)."),
    name: Optional[str] = typer.Option(None, "--name", help="The model's name in the API (default: the directory's)."),
    device: str = DeviceOption,
) -> None:
    """An OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a chat
    page at /, decoding concurrent requests together."""
    from lmtrain.errors import LmtrainError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LmtrainError("lmtrain serve needs FastAPI and uvicorn: pip install 'lmtrain[serve]'") from None
    from lmtrain.server import open_server, serve as run_server

    run = _run_or_model(run, model)
    server = open_server(run, checkpoint, device, api_key, slots, queue, context or 4096, name)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    typer.echo(f"serving {server.model_name} ({server.engine.context}-token context, up to {slots} requests at "
               f"once) at {where}/v1 and the chat page at {where}/", err=True)
    run_server(server, host, port)


@app.command(name="eval")
@user_errors
def eval_(
    run: Optional[Path] = ReadRunOption,
    model: Optional[Path] = ModelOption,
    checkpoint: str = CheckpointOption,
    data: Optional[str] = typer.Option(None, "--data", help="Score this corpus (data.source syntax) instead of the val split."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Multiple-choice task files (JSONL), comma-separated: report accuracy instead."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="--tasks: score the first N items of each file."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Windows (8) or task items (16) per forward pass."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=2, help="Score at most this many tokens."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="Score this GGUF export of the run (dequantized) instead of the checkpoint."),
    device: str = DeviceOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Bits per byte of a checkpoint on the val split or any corpus; or, with --tasks, its
    accuracy on multiple-choice tasks."""
    import json

    from lmtrain.errors import LmtrainError

    run = _run_or_model(run, model)
    if tasks is not None:
        if data is not None or max_tokens is not None or gguf is not None:
            raise LmtrainError("--tasks scores task files; --data, --max-tokens and --gguf are for bits per byte")
        from lmtrain.tasks import evaluate_tasks, format_table

        files = [f.strip() for f in tasks.split(",") if f.strip()]
        if not files:
            raise LmtrainError("--tasks: give one or more task files, separated by commas")
        scored = evaluate_tasks(run, files, checkpoint, device, batch_size or 16, limit)
        typer.echo(json.dumps(scored.to_dict()) if as_json else format_table(scored))
        return
    if limit is not None:
        raise LmtrainError("--limit counts task items; with bits per byte use --max-tokens")
    from lmtrain.evaluate import evaluate

    result = evaluate(run, checkpoint, data, device, batch_size or 8, max_tokens, gguf)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    rows = [("data", result.source), ("checkpoint", f"{result.checkpoint} (step {result.step})"),
            ("tokens scored", f"{result.tokens:,}"), ("UTF-8 bytes", f"{result.bytes:,}"),
            ("loss (nats/token)", f"{result.loss:.4f}"), ("perplexity", f"{result.ppl:.2f}"),
            ("bits per byte", f"{result.bpb:.4f}")]
    if result.unigram_bpb is not None:
        rows.append(("unigram byte baseline bpb", f"{result.unigram_bpb:.4f}"))
    width = max(len(name) for name, _ in rows)
    typer.echo("\n".join(f"{name:<{width}}  {value}" for name, value in rows))


@app.command()
@user_errors
def export(
    run: Path = RunOption,
    fmt: str = typer.Option(..., "--format", "-f", help="hf (a transformers directory), gguf (one file for llama.cpp) or peft (a LoRA run's adapters)."),
    out: Path = typer.Option(..., "--out", "-o", help="The directory (hf) or file (gguf) to write."),
    checkpoint: str = CheckpointOption,
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
    quant: Optional[str] = typer.Option(None, "--quant", help="gguf: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export at --out."),
) -> None:
    """Export a checkpoint for transformers (Llama or GPT-2), llama.cpp (GGUF, quantized with --quant) or
    peft (a LoRA run's adapters; hf and gguf merge them into the weights)."""
    from lmtrain.export import describe, export as run_export

    typer.echo(describe(run_export(run, fmt, out, checkpoint, dtype, force, quant)))


@app.command()
@user_errors
def plan(
    minutes: float = typer.Option(..., "--minutes", "-m", min=0.01, help="The training budget, in minutes."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the picked config here (YAML)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Measure this machine on model shapes around the config's and pick the one predicted to
    reach the lowest val bpb in MINUTES; --out writes its config for `lmtrain run`."""
    from lmtrain.plan import check_plan_args, format_plan, make_plan, write_plan

    cfg = _load(config, set_)
    check_plan_args(minutes, out, force)  # before a minute of measuring
    result = make_plan(cfg, minutes)
    typer.echo(format_plan(result))
    if out is not None:
        write_plan(result, out, force)
        typer.echo(f"wrote {out}: lmtrain run --config {out}")


@app.command()
@user_errors
def run(
    config: Optional[Path] = ConfigOption,
    set_: Optional[List[str]] = SetOption,
) -> None:
    """The whole pipeline: tokenize, shard, train, sample; finished stages are skipped."""
    cfg = _load(config, set_)

    def report(stage: str, message: str) -> None:
        typer.echo(f"[{stage}] {message}", err=True)

    prompt = cfg.sample.prompt

    def on_sample_text(piece: str) -> None:
        if not on_sample_text.started:
            sys.stdout.write(prompt)
            on_sample_text.started = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    on_sample_text.started = False
    with _writer(cfg, "run"):
        from lmtrain.pipeline import run_pipeline
        from lmtrain.train import TrainingInterrupted

        try:
            result = run_pipeline(cfg, report, on_sample_text)
        except TrainingInterrupted as stop:
            _stopped(stop, _resume_hint("run", config, set_))
    sys.stdout.write("\n")
    baseline = f" (unigram byte baseline {result.unigram_bpb:.3f})" if result.unigram_bpb is not None else ""
    bpb = f"{result.val_bpb:.4f}" if result.val_bpb is not None else "n/a"
    typer.echo(f"\nval bpb {bpb}{baseline}\n"
               f"watch it learn: tensorboard --logdir {cfg.run_dir / 'tb'}")


@app.command()
@user_errors
def keys(section: Optional[str] = typer.Argument(None, help="Only this section (run, data, model, train, ...).")) -> None:
    """Every config key with its default, its bounds and what it does (for --set and config files)."""
    from lmtrain.config import describe_keys

    typer.echo(describe_keys(section))


def _stopped(stop, hint: str) -> None:
    """Training stopped on a signal: say where it saved and how to go on; exit 128 + signal."""
    where = f"checkpoint {stop.checkpoint}" if stop.checkpoint else "no checkpoint"
    if _rank0():
        typer.echo(f"stopped at step {stop.step}; wrote {where}\nresume with: {hint}", err=True)
    raise typer.Exit(128 + stop.signum) from None


def _resume_hint(command: str, config: Optional[Path], overrides: Optional[List[str]]) -> str:
    parts = ["lmtrain", command]
    if config is not None:
        parts += ["--config", str(config)]
    for item in overrides or []:
        parts += ["--set", item if " " not in item else repr(item)]
    return " ".join(parts)


def main() -> None:
    app(prog_name="lmtrain")


if __name__ == "__main__":
    main()
