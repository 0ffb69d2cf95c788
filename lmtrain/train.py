"""`lmtrain train`: the training loop, over parts that live in their own modules.

``train(config)`` trains the GPT of ``config.model`` on the shards of ``RUN_DIR/data``. If the run
has a checkpoint it resumes from ``latest``; because batches are a pure function of the step and
every piece of state (weights, optimiser, grad scaler, RNG, the budget's decision) is checkpointed,
a resumed run computes exactly what an uninterrupted one would have.

``_setup`` checks everything and builds the parts; ``Trainer.fit`` is the loop over them. Each part
decides its own cadence (a checkpoint is due, an evaluation is due, the budget re-plans):

    lmtrain/data.py        RunData (the run's shards) and the batch sources the loop is handed
    lmtrain/step.py        build_training (model, optimiser, scaler) and StepRunner (one step)
    lmtrain/schedule.py    the learning-rate schedule the run follows
    lmtrain/budget.py      BudgetKeeper: train.max_minutes decides and re-plans that schedule
    lmtrain/timing.py      what the budget measures with (steps, evals, checkpoints timed)
    lmtrain/evaluate.py    Validator: val loss, perplexity, bits per byte, tasks
    lmtrain/metrics.py     progress bar, train.log, TensorBoard, MFU (TrainLog)
    lmtrain/checkpoint.py  Checkpointer (when and how to save)
    lmtrain/restore.py     Resume (loading one back), Pretrained (model.init_from's weights)
    lmtrain/optim.py, loss.py, device.py, fsdp.py   the optimiser, the losses, precision, sharding

A new kind of training data arrives as a batch source (``get(step, micro) -> (x, y)``) built in
``_setup``; the loop only calls it.

Under torchrun each process trains a DistributedDataParallel replica, or with ``train.parallel:
fsdp`` a shard of the model (lmtrain/fsdp.py); rank 0 alone writes checkpoints, TensorBoard
events and the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtrain import distributed as dist_util
from lmtrain.budget import BudgetKeeper, RunClock, epoch_steps
from lmtrain.checkpoint import STATE_FILE, Checkpointer, rng_state
from lmtrain.config import Config, TrainConfig
from lmtrain.data import RunData
from lmtrain.device import AMP_DTYPES, resolve_device, resolve_precision
from lmtrain.errors import CheckpointError, ConfigError, LmtrainError
from lmtrain.evaluate import Validator
from lmtrain.fsdp import sharded_run
from lmtrain.lora import check_config as check_lora
from lmtrain.memory import check_fits
from lmtrain.metrics import TrainLog
from lmtrain.model import GPTConfig
from lmtrain.pretrained import open_source, resolve
from lmtrain.restore import Pretrained, Resume
from lmtrain.rundir import check_run_dir_usable, checkpoints_dir, hold_run_dir, move_aside, prepare_run_dir, tb_dir, tokenizer_path
from lmtrain.schedule import Schedule, lr_at
from lmtrain.shards import Manifest
from lmtrain.step import Training, build_training, tokens_per_step
from lmtrain.timing import Measurer
from lmtrain.tokenizer import run_tokenizer_config

log = logging.getLogger(__name__)


class TrainingError(LmtrainError):
    """Training cannot go on (diverged, out of memory, ...)."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written. ``history`` holds
    what was logged up to then, as ``TrainResult.history`` would."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None,
                 history: list[dict[str, float]] | None = None) -> None:
        super().__init__(f"interrupted by signal {signum} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.history = history or []


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint's ``state.json`` and restored on resume."""

    step: int = 0  # optimiser steps done
    tokens_seen: int = 0
    best_val_loss: float | None = None
    train_seconds: float = 0.0  # wall time spent training, over every resume
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    bad_streak: int = 0  # ... of them in a row, up to now
    last_val: dict[str, float] | None = None  # the latest evaluation, with its step
    best_val: dict[str, float] | None = None  # the evaluation with the lowest val loss, with its step
    eval_seconds: float = 0.0  # of train_seconds: in evaluations
    checkpoint_seconds: float = 0.0  # ... and in writing checkpoints

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], path: Path) -> "TrainState":
        """The state a checkpoint's ``state.json`` (at ``path``) holds; a wrong type is a one-line
        ``CheckpointError`` naming the file, never a crash later in the loop."""
        state = cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})
        numbers = {"step": int, "tokens_seen": int, "train_seconds": (int, float), "skipped_steps": int,
                   "bad_streak": int, "best_val_loss": (int, float, type(None)), "eval_seconds": (int, float),
                   "checkpoint_seconds": (int, float)}
        for name, kind in numbers.items():
            value = getattr(state, name)
            if isinstance(value, bool) or not isinstance(value, kind) or (value is not None and value < 0):
                raise CheckpointError(f"{path}: {name} is {value!r}; the checkpoint is corrupt")
        for name in ("last_val", "best_val"):
            if getattr(state, name) is not None and not isinstance(getattr(state, name), dict):
                raise CheckpointError(f"{path}: {name} is {getattr(state, name)!r}; the checkpoint is corrupt")
        return state

    def record_eval(self, step: int, val: dict[str, float]) -> None:
        if self.best_val_loss is None or val["val_loss"] < self.best_val_loss:
            self.best_val_loss = val["val_loss"]
            self.best_val = {"step": step, **val}
        self.last_val = {"step": step, **val}


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    step: int
    max_steps: int
    resumed_from: str | None
    already_done: bool = False
    stopped_by: str = "max_steps"  # max_steps or max_minutes
    val_loss: float | None = None
    val_bpb: float | None = None
    best_val_loss: float | None = None
    best_val_bpb: float | None = None
    best_step: int | None = None  # the step of the best evaluation: what sample, eval and export read
    tokens_seen: int = 0
    seconds: float = 0.0
    tokens_per_sec: float = 0.0
    train_seconds: float = 0.0  # over every resume, with eval, checkpoints and the budget's probe
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    budget: dict[str, Any] | None = None  # the train.max_minutes decision, when there is one
    skipped_steps: int = 0
    checkpoint: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Entry point and setup
# --------------------------------------------------------------------------------------------


def train(config: Config, restart: bool = False) -> TrainResult:
    """Train (or resume) the run described by ``config``; see the module docstring."""
    config = run_tokenizer_config(resolve(config))
    info = dist_util.from_environment()
    check_world_size(config.train, info)
    device = resolve_device(config.train.device, "train.device", info.local_rank)
    dist_util.init(info, device.type)
    # Rank 0 holds the run directory's writer lock for the whole run (the other ranks write nothing).
    lock = hold_run_dir(config.run_dir, "train") if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            result = _setup(config, restart, info, device).fit()
        # All ranks leave together: a rank tearing the process group down while another still
        # writes its last checkpoint or sample has aborted in gloo ("terminate called ...").
        dist_util.barrier(info)
        return result
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise out_of_memory(config, exc) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            raise out_of_memory(config, exc) from None
        raise
    finally:
        dist_util.shutdown()


def _setup(config: Config, restart: bool, info: dist_util.DistInfo, device: torch.device) -> "Trainer":
    """Check the run's artifacts, build (or resume) the model, the optimiser and the loop's parts;
    then, on rank 0, write the config and move old checkpoints aside for ``--restart``. Everything
    that can be refused is checked before anything is written: a mistake costs nothing."""
    run_dir, tc = config.run_dir, config.train
    check_run_dir_usable(run_dir)
    data = RunData.open(config)
    precision = resolve_precision(tc.precision, device)
    if precision == "fp16" and sharded_run(tc, info.world_size):
        # GradScaler's inf check would see one shard per rank, and ranks could disagree on skipping.
        why = " (train.precision auto chose it: this GPU lacks bf16)" if tc.precision == "auto" else ""
        raise ConfigError(f"train.parallel fsdp trains in bf16 or fp32, not fp16{why}: set train.precision: "
                          "fp32 (or bf16 where the GPU has it), or train.parallel: ddp")
    checkpointer = Checkpointer(checkpoints_dir(run_dir), tc.checkpoint_every, tc.keep_checkpoints, info, device)
    check_lora(config, sharded_run(tc, info.world_size))
    latest = None if restart else checkpointer.latest()
    config, small = _small_corpus(config, data, latest, info, device, precision)
    tc = config.train
    resume = None
    if latest is not None:
        model_config = GPTConfig.of(config.model, data.manifest.vocab_size).to_dict()
        resume = Resume.load(latest, model_config, data.tokenizer_sha256, config)
    restore, base = resume, None
    if config.model.init_from is not None and (resume is None or tc.lora_rank):
        pretrained = Pretrained(open_source(config.model.init_from))
        if tc.lora_rank:
            base = pretrained  # frozen under the adapters, on a fresh run and on resume alike
        else:
            restore = pretrained
            log.info("train: starting from the weights of model.init_from (%s), with a fresh optimiser",
                     config.model.init_from)
    tasks = _encode_eval_tasks(config, data.manifest)
    need = check_fits(config, data.manifest.vocab_size, device, AMP_DTYPES[precision], info.world_size,
                      info.local_world_size)
    # What setup has to say, logged once train.log is open (Trainer.fit).
    notes = [f"memory: {need.describe()} (estimated; micro-batch {tc.batch_size} x "
             f"{config.model.block_size} tokens)"] + ([small] if small else [])
    if tc.parallel == "fsdp" and not info.enabled:
        notes.append("train.parallel fsdp: one process, so nothing is sharded (FSDP applies under torchrun)")
    teacher = None
    if tc.distill_from is not None:
        from lmtrain.distill import load_teacher

        teacher = load_teacher(tc.distill_from, tokenizer_path(run_dir), device)
        notes.append(f"distilling from {tc.distill_from} ({teacher.model.num_params() / 1e6:.2f}M "
                     f"parameters), alpha {tc.distill_alpha:g}, temperature {tc.distill_temperature:g}")
    training = build_training(config, data.manifest.vocab_size, device, precision, info, restore=restore,
                              teacher=teacher, base=base)
    if training.lora is not None:
        notes.append(_describe_lora(training, config))
    state = TrainState()
    if resume is not None:
        if "teacher" in resume.state:  # (checkpoints from before teachers were recorded have no key)
            from lmtrain.distill import check_same_teacher

            check_same_teacher(resume.state["teacher"], teacher, resume.path)
        state = TrainState.from_checkpoint(resume.state, resume.path / STATE_FILE)
        resume.restore_rng()
    val = data.manifest.splits["val"]
    val_tokens = val.trained_tokens if data.chat else val.tokens  # chat: bits per byte of the trained text
    validator = Validator(training.model, data.val, val_tokens, val.utf8_bytes, tc, device, AMP_DTYPES[precision],
                          info, tasks, data.packing if data.chat else None)
    if data.chat:
        notes.append(_describe_conversations(data, tc))
    keeper = BudgetKeeper(tc, Measurer(training, validator, checkpointer.directory, info, device),
                          resume.state.get("budget") if resume is not None else None, state.step,
                          state.train_seconds, info.is_main, str(resume.path / STATE_FILE) if resume else "",
                          resume.state.get("early_stop") if resume is not None else None,
                          epoch_steps(tc.max_epochs, data.epoch_tokens, tokens_per_step(config, info.world_size)))
    if info.is_main:
        _warn_about_the_schedule(keeper.schedule, state.step, resume)
        prepare_run_dir(config)
        if restart:
            for moved in (move_aside(checkpoints_dir(run_dir)), move_aside(tb_dir(run_dir))):
                if moved is not None:
                    log.info("--restart: moved %s aside", moved)
        else:
            checkpointer.repair_best()
    dist_util.barrier(info)
    batches = data.train_batches(config.run.seed, tc.batch_size, info.rank, info.world_size, device)
    return Trainer(config, info, device, precision, training, checkpointer, state,
                   resume.path.name if resume is not None else None, batches, validator, keeper,
                   data.manifest, data.tokenizer_sha256, notes)


def _small_corpus(config: Config, data: RunData, latest, info: dist_util.DistInfo, device: torch.device,
                  precision: str) -> tuple[Config, str | None]:
    """``lmtrain.small_data``: the optimiser settings (and dropout) for a corpus the run will see
    many times, and the line saying so; a resumed run keeps what its checkpoint was trained with."""
    from lmtrain.checkpoint import read_state
    from lmtrain.small_data import small_corpus_defaults

    saved = None
    if latest is not None:
        saved = read_state(latest).get("config")
        saved = saved if isinstance(saved, dict) else {}
    unique = data.epoch_tokens

    def step_seconds(timed: Config) -> float:
        from lmtrain.plan import pace

        return pace(timed, data.manifest.vocab_size, device, precision)

    # Under torchrun the ranks could time different paces and disagree: only max_steps decides there.
    return small_corpus_defaults(config, unique, tokens_per_step(config, info.world_size),
                                 None if info.enabled else step_seconds, saved)


def _describe_conversations(data: RunData, tc) -> str:
    """What a chat run trains on: conversations, rows, epochs, and what was cut or left out."""
    train = data.train
    rows = train.packed_rows(data.packing)
    per_step = tc.batch_size * tc.grad_accum
    trained = data.manifest.splits["train"].trained_tokens or 0
    text = (f"conversations: {len(train):,} to train on{_describe_mixture(train)}, {data.packing}ed into {rows:,} rows of "
            f"{train.window - 1} tokens ({rows / per_step:.1f} steps per epoch, {trained:,} trained tokens); "
            f"{tc.max_steps * per_step / max(rows, 1):.1f} epochs at train.max_steps {tc.max_steps}")
    if train.too_long:
        text += f"; {train.too_long} longer than model.block_size + 1 ({train.too_long_policy} by data.too_long)"
    if train.untrained:
        text += f"; {train.untrained} left out (no trained token within the window)"
    return text


def _describe_mixture(train) -> str:
    if not train.weights:
        return ""
    counts = [int((train.part == p).sum()) for p in range(len(train.weights))]
    return " (" + ", ".join(f"source {p}: {n:,} x {w:g}" for p, (n, w) in enumerate(zip(counts, train.weights))) + ")"


def _describe_lora(training: Training, config: Config) -> str:
    from lmtrain.lora import count_parameters

    trained, total = count_parameters(training.model)
    spec = training.lora.spec
    return (f"LoRA rank {spec.rank} (alpha {spec.alpha:g}) on {', '.join(spec.targets)}"
            f"{' and the norms' if spec.train_norms else ''} of model.init_from {config.model.init_from}: "
            f"{trained:,} of {total:,} parameters train ({100 * trained / total:.2f}%)")


def _encode_eval_tasks(config: Config, manifest: Manifest) -> list:
    """``train.eval_tasks``, read and tokenized once, up front: a bad task file is refused before
    training starts, not at its first evaluation."""
    if not config.train.eval_tasks:
        return []
    from lmtrain.tasks import encode_task, read_tasks
    from lmtrain.tokenizer import load_tokenizer

    try:
        tasks = read_tasks(config.train.eval_tasks, config.train.eval_tasks_limit)
    except LmtrainError as exc:
        raise ConfigError(f"train.eval_tasks: {exc}") from None
    tokenizer = load_tokenizer(config.run_dir)
    return [encode_task(task, tokenizer, manifest.eot_id, config.model.block_size) for task in tasks]


def _warn_about_the_schedule(schedule: Schedule, step: int, resume: Resume | None) -> None:
    """Say so when the learning rate will not do what the config seems to promise."""
    if schedule.warmup_steps > schedule.max_steps:
        log.warning("train.warmup_steps (%d) is longer than the run (train.max_steps %d): the learning "
                    "rate peaks at %.3g, never reaching train.lr %.3g", schedule.warmup_steps, schedule.max_steps,
                    lr_at(schedule.max_steps - 1, schedule), schedule.lr)
    saved = _saved_schedule(resume.state) if resume is not None else None
    if saved is None or step >= schedule.max_steps:
        return
    try:
        before = dataclasses.replace(schedule, **saved)
        was, now = lr_at(step, before), lr_at(step, schedule)
    except (TypeError, ValueError, ZeroDivisionError):
        return  # an older or odd state.json: nothing to compare against
    if not math.isclose(was, now, rel_tol=1e-9):
        changed = ", ".join(f"train.{_TRAIN_KEY.get(k, k)} {v!r} -> {getattr(schedule, k)!r}" for k, v in saved.items()
                            if v != getattr(schedule, k))
        log.warning("the learning-rate schedule changed on resume (%s): at step %d the learning rate "
                    "jumps from %.3g to %.3g", changed, step, was, now)


_TRAIN_KEY = {"kind": "schedule"}  # Schedule's fields by their train.* names, where they differ


def _saved_schedule(state: dict[str, Any]) -> dict[str, Any] | None:
    """The schedule a checkpoint was trained with: saved as such, or (older checkpoints) the
    ``train`` keys of its config."""
    saved = state.get("schedule")
    if isinstance(saved, dict):
        return {k: v for k, v in saved.items() if k in Schedule.__dataclass_fields__}
    train = (state.get("config") or {}).get("train")
    if not isinstance(train, dict):
        return None
    return {field: train[_TRAIN_KEY.get(field, field)] for field in Schedule.__dataclass_fields__
            if _TRAIN_KEY.get(field, field) in train}


def check_world_size(tc: TrainConfig, info: dist_util.DistInfo) -> None:
    """Every rank must get an equal share of the validation windows (checked before joining)."""
    val_windows = tc.eval_batches * tc.batch_size
    if info.enabled and val_windows % info.world_size:
        raise ConfigError(
            f"train.eval_batches x train.batch_size = {val_windows} validation windows cannot be split "
            f"evenly over {info.world_size} processes; make it a multiple of {info.world_size}"
        )


def out_of_memory(config: Config, exc: BaseException) -> TrainingError:
    return TrainingError(
        f"out of memory with train.batch_size={config.train.batch_size}, model.block_size="
        f"{config.model.block_size}, model.n_embd={config.model.n_embd}: lower train.batch_size (and "
        "raise train.grad_accum to keep the global batch), model.block_size or the model size")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class Trainer:
    """The loop over the parts ``_setup`` built: the step (``training``), the batch source, the
    ``validator``, the ``checkpointer``, the budget ``keeper`` (which owns the schedule) and the
    log. Each part decides when it is due; the loop only calls them in order."""

    def __init__(self, config: Config, info: dist_util.DistInfo, device: torch.device, precision: str,
                 training: Training, checkpointer: Checkpointer, state: TrainState, resumed_from: str | None,
                 batches, validator: Validator, keeper: BudgetKeeper, manifest: Manifest, tokenizer_sha256: str,
                 notes: list[str] | None = None) -> None:
        self.config, self.tc, self.info, self.device, self.precision = config, config.train, info, device, precision
        self.training, self.model = training, training.model
        self.checkpointer, self.state, self.resumed_from = checkpointer, state, resumed_from
        self.batches, self.validator, self.keeper = batches, validator, keeper
        self.manifest, self.tokenizer_sha256 = manifest, tokenizer_sha256
        self.tokens_per_step = tokens_per_step(config, info.world_size)
        self.history: list[dict[str, float]] = []
        self.notes = notes or []  # setup's lines for the log (memory estimate, teacher)
        self.tokenizer = None
        # A sharded model generates on every rank (its forward passes are collectives); rank 0 logs.
        if self.tc.sample_every and (info.is_main or sharded_run(self.tc, info.world_size)):
            from lmtrain.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(config.run_dir)

    def fit(self) -> TrainResult:
        state, keeper = self.state, self.keeper
        if keeper.out_of_time(state.train_seconds):
            return self._result(already_done=True, stopped_by="max_minutes")
        if state.step >= keeper.schedule.max_steps:
            return self._result(already_done=True)
        start_step, stop = state.step, None
        with TrainLog(self.config, self.config.run_dir, self.model, self.device, self.info, start_step,
                      keeper.schedule.max_steps) as metrics, StopSignals() as signals:
            self.history = metrics.history
            metrics.epoch_tokens = getattr(self.batches, "epoch_tokens", None)
            metrics.announce(self.model, self.precision, self.resumed_from)
            for note in self.notes if self.info.is_main else []:
                log.info("%s", note)
            keeper.start(state, self.batches)
            metrics.set_total(keeper.schedule.max_steps)
            announced = keeper.decided  # (a budget decided from the run's own first steps: say it then)
            if announced:
                metrics.announce_epochs(keeper.schedule.max_steps)
            clock = RunClock(state.train_seconds)
            while state.step < keeper.schedule.max_steps:
                began = time.perf_counter()
                self._step(metrics)
                state.train_seconds = clock.now()
                if keeper.after_step(state, time.perf_counter() - began, clock, start_step):
                    metrics.set_total(keeper.schedule.max_steps)
                    if not announced:
                        metrics.announce_epochs(keeper.schedule.max_steps)
                        announced = True
                stop = self._stop_reason(signals)
                self._evaluate_and_save(stop is not None, clock, metrics)
                if stop == "max_minutes" and self.info.is_main:
                    log.info("train.max_minutes reached (%.1f min): stopping at step %d",
                             state.train_seconds / 60, state.step)
                if stop is not None:
                    break
            self._book(clock)
            summary = keeper.summary(state)
            if summary is not None and self.info.is_main:
                log.info("%s", summary)
        if stop == "signal":
            raise TrainingInterrupted(signals.signum or signal.SIGTERM, state.step, self.checkpointer.last,
                                      self.history)
        result = self._result(stopped_by=stop or "max_steps")
        result.start_step, result.seconds = start_step, clock.elapsed()
        result.tokens_per_sec = (state.step - start_step) * self.tokens_per_step / max(result.seconds, 1e-9)
        return result

    # -- the parts of a step ------------------------------------------------------------------

    def _step(self, metrics: TrainLog) -> None:
        """One optimiser step, counted and logged; a non-finite loss or gradient skips the update,
        and ``train.max_bad_steps`` of them in a row stop the run."""
        state = self.state
        lr = lr_at(state.step, self.keeper.schedule)
        loss, norm, applied = self.training.runner.run(state.step, self.batches, lr)
        if applied:
            state.bad_streak = 0
        else:
            state.bad_streak += 1
            state.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)",
                        state.step + 1, state.bad_streak)
            if state.bad_streak >= self.tc.max_bad_steps:
                raise TrainingError(
                    f"{state.bad_streak} non-finite steps in a row at step {state.step + 1}: training "
                    "diverged. Lower train.lr, raise train.warmup_steps or use "
                    "train.precision: bf16/fp32; the last good checkpoint is untouched")
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        metrics.step(state.step, loss, norm, lr)

    def _evaluate_and_save(self, stopping: bool, clock: RunClock, metrics: TrainLog) -> None:
        """Whatever is due after this step: an evaluation, a text sample, a checkpoint (at the end
        and when stopping, always)."""
        state = self.state
        save = self.checkpointer.due(state.step, state.step == self.keeper.schedule.max_steps or stopping)
        val = None
        if self.validator.due(state.step, save):
            best_before = state.best_val_loss
            with clock.timing("eval"):
                val = self._evaluate(metrics)
            # A new best is kept whatever train.checkpoint_every says: on a small corpus the best
            # model can come between two checkpoints, and it is what the user reads afterwards.
            save = save or (self.tc.checkpoint_best and (best_before is None or val["val_loss"] < best_before))
            if self.keeper.after_eval(state, val["val_loss"]):
                metrics.set_total(self.keeper.schedule.max_steps)
        if self.tc.sample_every and state.step % self.tc.sample_every == 0 and self.tokenizer is not None:
            metrics.text("sample", self._sample(), state.step)
        if save:
            with clock.timing("checkpoint"):
                self._book(clock)  # the evaluations and checkpoints before this one
                self.checkpointer.save(state.step, self.training, self._checkpoint_state(val))

    def _book(self, clock: RunClock) -> None:
        """Bring the run's time in ``state`` up to now (evaluations and checkpoints timed so far)."""
        state = self.state
        state.eval_seconds += clock.take("eval")
        state.checkpoint_seconds += clock.take("checkpoint")
        state.train_seconds = clock.now()

    def _stop_reason(self, signals: "StopSignals") -> str | None:
        """``signal`` (Ctrl-C, SIGTERM), ``max_minutes``, or None; every rank agrees."""
        stop_signal, stop_time = signals.signum is not None, self.keeper.out_of_time(self.state.train_seconds)
        if self.info.enabled:
            stop_signal = dist_util.any_rank(stop_signal, self.info, self.device)
            stop_time = dist_util.any_rank(stop_time, self.info, self.device)
        return "signal" if stop_signal else "max_minutes" if stop_time else None

    def _evaluate(self, metrics: TrainLog) -> dict[str, float]:
        val, scores = self.validator.run()
        self.state.record_eval(self.state.step, val)
        metrics.eval(self.state.step, val)
        for score in scores:
            metrics.task(self.state.step, score)
        return val

    def _sample(self) -> str:
        from lmtrain.generate import SamplingParams
        from lmtrain.sample import sample_text

        sc = self.config.sample
        return sample_text(self.model, self.tokenizer, sc.prompt, self.manifest.eot_id,
                           SamplingParams(temperature=sc.temperature, top_k=sc.top_k), self.config.run.seed,
                           AMP_DTYPES[self.precision])

    def _checkpoint_state(self, val: dict[str, float] | None) -> dict[str, Any]:
        return {**dataclasses.asdict(self.state), "val_loss": val["val_loss"],
                "model_config": self.model.config.to_dict(), "tokenizer_sha256": self.tokenizer_sha256,
                "config": self.config.to_dict(), "rng": rng_state(), "precision": self.precision,
                "lora": self.training.lora.to_dict() if self.training.lora is not None else None,
                "budget": self.keeper.state_dict(), "schedule": self.keeper.schedule.to_dict(),
                "early_stop": self.keeper.early_stop_state(),
                "teacher": self.training.runner.teacher.record if self.training.runner.teacher is not None else None}

    def _result(self, already_done: bool = False, stopped_by: str = "max_steps") -> TrainResult:
        state, last, best = self.state, self.state.last_val or {}, self.state.best_val or {}
        return TrainResult(
            run_dir=self.config.run_dir, start_step=state.step, step=state.step,
            max_steps=self.keeper.schedule.max_steps, resumed_from=self.resumed_from, already_done=already_done,
            stopped_by=stopped_by, val_loss=last.get("val_loss"), val_bpb=last.get("val_bpb"),
            best_val_loss=state.best_val_loss, best_val_bpb=best.get("val_bpb"), best_step=best.get("step"),
            tokens_seen=state.tokens_seen, skipped_steps=state.skipped_steps,
            checkpoint=self.checkpointer.last, history=self.history, train_seconds=state.train_seconds,
            eval_seconds=state.eval_seconds, checkpoint_seconds=state.checkpoint_seconds,
            budget=self.keeper.state_dict())


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class StopSignals:
    """The first SIGINT/SIGTERM asks to stop after the current step; a second SIGINT exits now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing this step, then writing a checkpoint "
                    "(Ctrl-C again to quit at once)", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
