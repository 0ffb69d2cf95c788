"""`lmtrain train`: the training loop, over parts that live in their own modules.

``train(config)`` trains the GPT of ``config.model`` on the shards of ``RUN_DIR/data``. If the run
has a checkpoint it resumes from ``latest``; because batches are a pure function of the step and
every piece of state (weights, optimiser, grad scaler, RNG) is checkpointed, a resumed run
computes exactly what an uninterrupted one would have.

Where things are:

    lmtrain/step.py        build_training (model, optimiser, scaler) and StepRunner (one step)
    lmtrain/optim.py       the optimiser and the learning-rate schedule
    lmtrain/loss.py        the losses the step may use instead of the standard one
    lmtrain/device.py      device, precision, autocast, peak FLOPs, memory
    lmtrain/data.py        training and validation batches from the shards
    lmtrain/evaluate.py    val loss, perplexity, bits per byte
    lmtrain/metrics.py     progress bar, train.log, TensorBoard, MFU (TrainLog)
    lmtrain/checkpoint.py  Checkpointer (when and how to save), Resume (loading one back)

Under torchrun each process trains a DistributedDataParallel replica, or with ``train.parallel:
fsdp`` a shard of the model (lmtrain/sharding.py); rank 0 alone writes checkpoints, TensorBoard
events and the log.
"""

from __future__ import annotations

import bisect
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
from lmtrain.artifacts import check_shards_agree, check_tokenizer_agrees
from lmtrain.budget import replan_due
from lmtrain.checkpoint import STATE_FILE, Checkpointer, Resume, rng_state
from lmtrain.config import Config, TrainConfig
from lmtrain.data import TokenWindows, TrainBatches, val_positions
from lmtrain.device import AMP_DTYPES, resolve_device, resolve_precision
from lmtrain.errors import CheckpointError, ConfigError, LmtrainError
from lmtrain.evaluate import val_loss, val_metrics
from lmtrain.fsutil import sha256_file
from lmtrain.lora import check_config as check_lora
from lmtrain.memory import check_fits
from lmtrain.metrics import TrainLog
from lmtrain.optim import lr_at
from lmtrain.model import GPTConfig
from lmtrain.rundir import (check_run_dir_usable, checkpoints_dir, data_dir, hold_run_dir, move_aside, prepare_run_dir,
                            tb_dir, tokenizer_path)
from lmtrain.shards import Manifest, read_manifest
from lmtrain.step import Training, build_training, shards, tokens_per_step

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
    eval_seconds: float = 0.0  # of train_seconds: in evaluations
    checkpoint_seconds: float = 0.0  # ... and in writing checkpoints
    budget: dict[str, Any] | None = None  # train.max_minutes' decision (lmtrain.budget.Budget)

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
        if state.last_val is not None and not isinstance(state.last_val, dict):
            raise CheckpointError(f"{path}: last_val is {state.last_val!r}; the checkpoint is corrupt")
        if state.budget is not None:
            from lmtrain.budget import Budget

            try:
                Budget.from_dict(state.budget)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise CheckpointError(f"{path}: budget is {state.budget!r}; the checkpoint is corrupt") from None
        return state

    def record_eval(self, step: int, val: dict[str, float]) -> None:
        if self.best_val_loss is None or val["val_loss"] < self.best_val_loss:
            self.best_val_loss = val["val_loss"]
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
    from lmtrain.pretrained import resolve

    config = resolve(config)
    info = dist_util.from_environment()
    check_world_size(config.train, info)
    device = resolve_device(config.train.device, "train.device", info.local_rank)
    dist_util.init(info, device.type)
    # Rank 0 holds the run directory's writer lock for the whole run (the other ranks write nothing).
    lock = hold_run_dir(config.run_dir, "train") if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            return _setup(config, restart, info, device).fit()
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise out_of_memory(config, exc) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            raise out_of_memory(config, exc) from None
        raise
    finally:
        dist_util.shutdown()


@dataclass
class RunData:
    """What training reads from the run directory, checked before anything is written."""

    tokenizer_sha256: str
    manifest: Manifest
    train: TokenWindows
    val: TokenWindows

    @classmethod
    def open(cls, config: Config) -> "RunData":
        tok_file = tokenizer_path(config.run_dir)
        if not tok_file.exists():
            raise LmtrainError(f"no tokenizer at {tok_file}; run `lmtrain tokenize` and `lmtrain shard` first")
        check_tokenizer_agrees(config)
        sha = sha256_file(tok_file)
        check_shards_agree(config, sha)
        directory = data_dir(config.run_dir)
        manifest = read_manifest(directory)
        # TokenWindows (open_split) refuses shards made with another tokenizer.
        window = config.model.block_size + 1
        return cls(sha, manifest, TokenWindows(directory, "train", window, sha),
                   TokenWindows(directory, "val", window, sha))


def _setup(config: Config, restart: bool, info: dist_util.DistInfo, device: torch.device) -> "Trainer":
    """Check the run's artifacts, build (or resume) the model and optimiser; then, on rank 0,
    write the config and move old checkpoints aside for ``--restart``. Everything that can be
    refused is checked before anything is written: a mistake costs nothing."""
    run_dir = config.run_dir
    check_run_dir_usable(run_dir)
    data = RunData.open(config)
    precision = resolve_precision(config.train.precision, device)
    if precision == "fp16" and shards(config.train, info):
        # GradScaler's inf check would see one shard per rank, and ranks could disagree on skipping.
        why = " (train.precision auto chose it: this GPU lacks bf16)" if config.train.precision == "auto" else ""
        raise ConfigError(f"train.parallel fsdp trains in bf16 or fp32, not fp16{why}: set train.precision: "
                          "fp32 (or bf16 where the GPU has it), or train.parallel: ddp")
    checkpointer = Checkpointer(checkpoints_dir(run_dir), config.train.checkpoint_every,
                                config.train.keep_checkpoints, info, device)
    check_lora(config, shards(config.train, info))
    resume = None
    latest = None if restart else checkpointer.latest()
    if latest is not None:
        model_config = GPTConfig.of(config.model, data.manifest.vocab_size).to_dict()
        resume = Resume.load(latest, model_config, data.tokenizer_sha256, config)
    restore, base = resume, None
    if config.model.init_from is not None and (resume is None or config.train.lora_rank):
        from lmtrain.pretrained import Pretrained, open_source

        pretrained = Pretrained(open_source(config.model.init_from))
        if config.train.lora_rank:
            base = pretrained  # frozen under the adapters, on a fresh run and on resume alike
        else:
            restore = pretrained
            log.info("train: starting from the weights of model.init_from (%s), with a fresh optimiser",
                     config.model.init_from)
    tasks = _encode_eval_tasks(config, data.manifest)
    need = check_fits(config, data.manifest.vocab_size, device, AMP_DTYPES[precision], info.world_size,
                      info.local_world_size)
    # What setup has to say, logged once train.log is open (Trainer.fit).
    notes = [f"memory: {need.describe()} (estimated; micro-batch {config.train.batch_size} x "
             f"{config.model.block_size} tokens)"]
    if config.train.parallel == "fsdp" and not info.enabled:
        notes.append("train.parallel fsdp: one process, so nothing is sharded (FSDP applies under torchrun)")
    teacher = None
    if config.train.distill_from is not None:
        from lmtrain.distill import load_teacher

        teacher = load_teacher(config.train.distill_from, tokenizer_path(run_dir), device)
        notes.append(f"distilling from {config.train.distill_from} ({teacher.model.num_params() / 1e6:.2f}M "
                     f"parameters), alpha {config.train.distill_alpha:g}, temperature "
                     f"{config.train.distill_temperature:g}")
    training = build_training(config, data.manifest.vocab_size, device, precision, info, restore=restore,
                              teacher=teacher, base=base)
    if training.lora is not None:
        from lmtrain.lora import count_parameters

        trained, total = count_parameters(training.model)
        spec = training.lora.spec
        notes.append(f"LoRA rank {spec.rank} (alpha {spec.alpha:g}) on {', '.join(spec.targets)}"
                     f"{' and the norms' if spec.train_norms else ''} of model.init_from {config.model.init_from}: "
                     f"{trained:,} of {total:,} parameters train ({100 * trained / total:.2f}%)")
    state = TrainState()
    if resume is not None:
        state = TrainState.from_checkpoint(resume.state, resume.path / STATE_FILE)
        resume.restore_rng()
    _keep_the_recorded_budget(config.train, state, info)
    if info.is_main:
        _warn_about_the_schedule(config.train, state.step, resume)
        prepare_run_dir(config)
        if restart:
            for moved in (move_aside(checkpoints_dir(run_dir)), move_aside(tb_dir(run_dir))):
                if moved is not None:
                    log.info("--restart: moved %s aside", moved)
        else:
            checkpointer.repair_best()
    dist_util.barrier(info)
    return Trainer(config, info, device, precision, data, training, checkpointer, state,
                   resume.path.name if resume is not None else None, tasks, notes)


def _keep_the_recorded_budget(tc: TrainConfig, state: TrainState, info: dist_util.DistInfo) -> None:
    """A run resumed under the same ``train.max_minutes`` keeps the step count its budget decided
    (and so its schedule); a changed budget is re-planned from the recorded costs (no new probe)."""
    if tc.max_minutes is None or not tc.fit_to_budget:
        state.budget = None  # no budget to fit now: train.max_steps lays out the schedule
    if state.budget is None:
        return
    from lmtrain.budget import Budget, plan

    budget = Budget.from_dict(state.budget)
    if budget.minutes != tc.max_minutes:
        replanned = plan(tc.max_minutes, budget.costs, tc, state.step, state.train_seconds, budget.probe_seconds)
        if info.is_main:
            log.info("train.max_minutes changed (%g -> %g): the run now ends at step %d (was %d)", budget.minutes,
                     tc.max_minutes, replanned.max_steps, budget.max_steps)
        budget = replanned
        state.budget = budget.to_dict()
    tc.max_steps = budget.max_steps
    if budget.warmup_steps is not None:
        tc.warmup_steps = budget.warmup_steps


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


def _warn_about_the_schedule(tc: TrainConfig, step: int, resume: Resume | None) -> None:
    """Say so when the learning rate will not do what the config seems to promise."""
    if tc.warmup_steps > tc.max_steps:
        log.warning("train.warmup_steps (%d) is longer than the run (train.max_steps %d): the learning "
                    "rate peaks at %.3g, never reaching train.lr %.3g", tc.warmup_steps, tc.max_steps,
                    lr_at(tc.max_steps - 1, tc), tc.lr)
    saved = (resume.state.get("config") or {}).get("train") if resume is not None else None
    if not isinstance(saved, dict) or step >= tc.max_steps:
        return
    schedule_keys = ("max_steps", "warmup_steps", "schedule", "decay_fraction", "lr", "min_lr")
    try:
        before = dataclasses.replace(tc, **{k: saved[k] for k in schedule_keys if k in saved})
        was, now = lr_at(step, before), lr_at(step, tc)
    except (TypeError, ValueError, ZeroDivisionError):
        return  # an older or odd state.json: nothing to compare against
    if not math.isclose(was, now, rel_tol=1e-9):
        changed = ", ".join(f"train.{k} {saved[k]!r} -> {getattr(tc, k)!r}" for k in schedule_keys
                            if k in saved and saved[k] != getattr(tc, k))
        log.warning("the learning-rate schedule changed on resume (%s): at step %d the learning rate "
                    "jumps from %.3g to %.3g", changed, step, was, now)


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
    """Runs the loop over parts built by ``_setup``; holds no logic of its own beyond the loop."""

    def __init__(self, config: Config, info: dist_util.DistInfo, device: torch.device, precision: str,
                 data: RunData, training: Training, checkpointer: Checkpointer, state: TrainState,
                 resumed_from: str | None, tasks: list | None = None, notes: list[str] | None = None) -> None:
        self.config, self.tc, self.info, self.device, self.precision = config, config.train, info, device, precision
        self.data, self.training, self.model = data, training, training.model
        self.checkpointer, self.state, self.resumed_from = checkpointer, state, resumed_from
        self.tasks = tasks or []  # encoded multiple-choice tasks (lmtrain.tasks), scored with each eval
        self.val_positions = val_positions(data.val, self.tc.eval_batches * self.tc.batch_size)
        self.tokens_per_step = tokens_per_step(config, info.world_size)
        self.history: list[dict[str, float]] = []
        self.notes = notes or []  # setup's lines for the log (memory estimate, teacher)
        self.tokenizer = None
        # A sharded model generates on every rank (its forward passes are collectives); rank 0 logs.
        if self.tc.sample_every and (info.is_main or shards(self.tc, info)):
            from lmtrain.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(config.run_dir)

    def fit(self) -> TrainResult:
        tc, state = self.tc, self.state
        if self._out_of_time():
            return self._result(already_done=True, stopped_by="max_minutes")
        if state.step >= tc.max_steps:
            return self._result(already_done=True)
        batches = TrainBatches(self.data.train, self.config.run.seed, tc.batch_size, self.info.rank,
                               self.info.world_size, self.device)
        start_step = state.step
        stop = None
        with TrainLog(self.config, self.config.run_dir, self.model, self.device, self.info, start_step) as metrics, \
                StopSignals() as signals:
            self.history = metrics.history
            metrics.announce(self.model, self.precision, self.resumed_from)
            if self.info.is_main:
                for note in self.notes:
                    log.info("%s", note)
            # train.max_minutes: the run's own first (warmup) steps are timed for the decision, or,
            # when they cannot be, a probe runs first (lmtrain.budget). plan() refuses a budget that
            # fits no schedule.
            probe_end, step_seconds = None, []
            if tc.max_minutes is not None and tc.fit_to_budget and state.budget is None:
                from lmtrain.budget import free_probe_end

                probe_end = free_probe_end(tc, state.step)
                if probe_end is None:
                    self._plan_the_budget(batches)
                    metrics.set_total(tc.max_steps)
            seconds_before, pace = state.train_seconds, _Pace()
            run_start = time.perf_counter()
            while state.step < tc.max_steps:
                began = time.perf_counter()
                loss, norm, applied = self.training.runner.run(state.step, batches)
                self._count_bad_step(applied)
                state.step += 1
                state.tokens_seen += self.tokens_per_step
                metrics.step(state.step, loss, norm)
                state.train_seconds = seconds_before + time.perf_counter() - run_start
                decided = False
                if probe_end is not None:
                    step_seconds.append(time.perf_counter() - began)
                    if self._decide_now(probe_end):
                        with pace.timing("probe"):
                            self._plan_from_steps(step_seconds)
                        state.train_seconds = seconds_before + time.perf_counter() - run_start
                        metrics.set_total(tc.max_steps)
                        probe_end, decided = None, True
                # (Not right after the decision: it has just timed these very steps.)
                if state.budget is not None and not decided and replan_due(tc, state.step):
                    self._keep_within_budget(pace, state.step - start_step, metrics)
                stop = self._stop_reason(signals)
                final = state.step == tc.max_steps or stop is not None
                save = self.checkpointer.due(state.step, final)
                if state.step % tc.eval_every == 0 or save:  # every checkpoint records its val loss
                    with pace.timing("eval"):
                        val = self._evaluate(metrics)
                if tc.sample_every and state.step % tc.sample_every == 0 and self.tokenizer is not None:
                    metrics.text("sample", self._sample(), state.step)
                if save:
                    with pace.timing("checkpoint"):
                        state.eval_seconds += pace.take("eval")
                        state.checkpoint_seconds += pace.take("checkpoint")  # the ones before this
                        state.train_seconds = seconds_before + time.perf_counter() - run_start
                        self.checkpointer.save(state.step, self.training, self._checkpoint_state(val))
                if stop == "max_minutes" and self.info.is_main:
                    log.info("train.max_minutes reached (%.1f min): stopping at step %d",
                             state.train_seconds / 60, state.step)
                if stop is not None:
                    break
            seconds = time.perf_counter() - run_start
            state.eval_seconds += pace.take("eval")
            state.checkpoint_seconds += pace.take("checkpoint")  # the last one's
            state.train_seconds = seconds_before + seconds
            if state.budget is not None and self.info.is_main:
                from lmtrain.budget import spent

                log.info("%s", spent(state.budget, state.step, state.tokens_seen, state.train_seconds,
                                     state.eval_seconds, state.checkpoint_seconds))
        if stop == "signal":
            raise TrainingInterrupted(signals.signum or signal.SIGTERM, state.step, self.checkpointer.last,
                                      self.history)
        result = self._result(stopped_by=stop or "max_steps")
        result.start_step, result.seconds = start_step, seconds
        result.tokens_per_sec = (state.step - start_step) * self.tokens_per_step / max(seconds, 1e-9)
        return result

    # -- the parts of a step ------------------------------------------------------------------

    def _count_bad_step(self, applied: bool) -> None:
        """A non-finite loss or gradient skips the update; ``train.max_bad_steps`` in a row stop."""
        state = self.state
        if applied:
            state.bad_streak = 0
            return
        state.bad_streak += 1
        state.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)",
                    state.step + 1, state.bad_streak)
        if state.bad_streak >= self.tc.max_bad_steps:
            raise TrainingError(
                f"{state.bad_streak} non-finite steps in a row at step {state.step + 1}: training "
                "diverged. Lower train.lr, raise train.warmup_steps or use "
                "train.precision: bf16/fp32; the last good checkpoint is untouched")

    def _plan_the_budget(self, batches) -> None:
        """``train.max_minutes``: probe this machine up front, then decide (``_decide``)."""
        from lmtrain.budget import probe

        costs, probe_seconds = probe(self, batches, self.tc.max_minutes * 60 - self.state.train_seconds)
        self.state.train_seconds += probe_seconds
        self._decide(costs, probe_seconds, f"probe {probe_seconds:.1f} s")

    def _decide_now(self, probe_end: int) -> bool:
        """Whether the budget's decision is due: its timed steps are done, or the time is (plan()
        then says how few steps the budget buys). Every rank decides together."""
        due = self.state.step >= probe_end or self._out_of_time()
        return dist_util.any_rank(due, self.info, self.device) if self.info.enabled else due

    def _plan_from_steps(self, step_seconds: list[float]) -> None:
        """``train.max_minutes``, decided from the run's own timed steps (``budget.measure``)."""
        from lmtrain.budget import measure

        costs, seconds = measure(self, step_seconds)
        self._decide(costs, seconds, f"timed over steps 2-{len(step_seconds)} of this run", spent=seconds, owes=True)

    def _decide(self, costs, measuring_seconds: float, how: str, spent: float = 0.0, owes: bool = False) -> None:
        """Fix ``train.max_steps`` to what the budget pays for at ``costs``, and record the decision;
        ``spent``: seconds of measuring not yet in ``state.train_seconds``; ``owes``: decided inside
        the loop, before this step's evaluation and checkpoint."""
        from lmtrain.budget import plan

        tc, state = self.tc, self.state
        budget = plan(tc.max_minutes, costs, tc, state.step, state.train_seconds + spent, measuring_seconds,
                      owes=owes)
        state.budget = budget.to_dict()
        if self.info.is_main:
            log.info("train.max_minutes %g: %d more steps fit (%s; %s), so the schedule ends at step %d instead of "
                     "train.max_steps %d", tc.max_minutes, budget.max_steps - state.step, costs.describe(), how,
                     budget.max_steps, tc.max_steps)
        tc.max_steps, tc.warmup_steps = budget.max_steps, budget.warmup_steps

    def _keep_within_budget(self, pace: "_Pace", steps: int, metrics: TrainLog) -> None:
        """Move the end (and so the decay) to the pace measured: earlier if the run goes slower than
        its budget planned, later if it leaves time while the end can still move (``budget.replan``)."""
        from lmtrain.budget import Budget, Costs, replan

        budget = Budget.from_dict(self.state.budget)
        planned = budget.costs
        mine = pace.costs(steps, time.perf_counter(), planned)
        *figures, spent = dist_util.max_over_ranks([mine.step, mine.eval, mine.checkpoint, self.state.train_seconds],
                                                   self.info, self.device)
        last = replan(budget, Costs(*figures), self.tc, self.state.step, spent)
        if last is None:
            return
        # The figures behind a move: a step's and an evaluation's, measured and planned (either, or
        # the margin left as the run nears its end, can move it).
        measured = f"{figures[0]:.3g} s a step, {figures[1]:.3g} s an eval; planned {planned.step:.3g}, {planned.eval:.3g}"
        if self.info.is_main and last < self.tc.max_steps:
            log.warning("step %d: training runs slower than the probe measured (%s): the run now ends at step %d "
                        "instead of %d, with its decay, inside train.max_minutes %g", self.state.step, measured, last,
                        self.tc.max_steps, budget.minutes)
        elif self.info.is_main:
            log.info("step %d: the pace measured leaves time for more steps (%s): the run now ends at step %d instead "
                     "of %d, still inside train.max_minutes %g", self.state.step, measured, last, self.tc.max_steps,
                     budget.minutes)
        budget.replans.append({"at": self.state.step, "max_steps": last, "step_seconds": figures[0]})
        budget.max_steps = last
        self.state.budget = budget.to_dict()
        self.tc.max_steps = last
        metrics.set_total(last)

    def evaluate_quietly(self, micro_batches: int | None = None) -> None:
        """An evaluation as the loop runs it, logging nothing (the budget times it); with
        ``micro_batches``, only that many of its micro-batches on each rank, and no tasks."""
        positions = self.val_positions
        if micro_batches is not None:
            positions = positions[: micro_batches * self.tc.batch_size * self.info.world_size]
        val_loss(self.model, self.data.val, positions, self.tc.batch_size, self.device,
                 AMP_DTYPES[self.precision], self.info)
        if self.tasks and micro_batches is None:
            from lmtrain.tasks import score_task

            for task in self.tasks:
                score_task(self.model, task, self.device, AMP_DTYPES[self.precision], self.tc.batch_size, self.info)

    def _out_of_time(self) -> bool:
        return self.tc.max_minutes is not None and self.state.train_seconds >= self.tc.max_minutes * 60

    def _stop_reason(self, signals: "StopSignals") -> str | None:
        """``signal`` (Ctrl-C, SIGTERM), ``max_minutes``, or None; every rank agrees."""
        stop_signal, stop_time = signals.signum is not None, self._out_of_time()
        if self.info.enabled:
            stop_signal = dist_util.any_rank(stop_signal, self.info, self.device)
            stop_time = dist_util.any_rank(stop_time, self.info, self.device)
        return "signal" if stop_signal else "max_minutes" if stop_time else None

    def _evaluate(self, metrics: TrainLog) -> dict[str, float]:
        loss = val_loss(self.model, self.data.val, self.val_positions, self.tc.batch_size, self.device,
                        AMP_DTYPES[self.precision], self.info)
        split = self.data.manifest.splits["val"]
        val = val_metrics(loss, split.tokens, split.utf8_bytes)
        self.state.record_eval(self.state.step, val)
        metrics.eval(self.state.step, val)
        if self.tasks:
            from lmtrain.tasks import score_task

            for task in self.tasks:
                metrics.task(self.state.step, score_task(self.model, task, self.device, AMP_DTYPES[self.precision],
                                                         self.tc.batch_size, self.info))
        return val

    def _sample(self) -> str:
        from lmtrain.generate import SamplingParams
        from lmtrain.sample import sample_text

        sc = self.config.sample
        return sample_text(self.model, self.tokenizer, sc.prompt, self.data.manifest.eot_id,
                           SamplingParams(temperature=sc.temperature, top_k=sc.top_k), self.config.run.seed,
                           AMP_DTYPES[self.precision])

    def _checkpoint_state(self, val: dict[str, float]) -> dict[str, Any]:
        return {**dataclasses.asdict(self.state), "val_loss": val["val_loss"],
                "model_config": self.model.config.to_dict(), "tokenizer_sha256": self.data.tokenizer_sha256,
                "config": self.config.to_dict(), "rng": rng_state(), "precision": self.precision,
                "lora": self.training.lora.to_dict() if self.training.lora is not None else None}

    def _result(self, already_done: bool = False, stopped_by: str = "max_steps") -> TrainResult:
        state, last = self.state, self.state.last_val or {}
        return TrainResult(
            run_dir=self.config.run_dir, start_step=state.step, step=state.step, max_steps=self.tc.max_steps,
            resumed_from=self.resumed_from, already_done=already_done, stopped_by=stopped_by,
            val_loss=last.get("val_loss"), val_bpb=last.get("val_bpb"), best_val_loss=state.best_val_loss,
            tokens_seen=state.tokens_seen, skipped_steps=state.skipped_steps, checkpoint=self.checkpointer.last,
            history=self.history, train_seconds=state.train_seconds, eval_seconds=state.eval_seconds,
            checkpoint_seconds=state.checkpoint_seconds, budget=state.budget)


class _Pace:
    """Where this session's loop time goes: evals, checkpoints and the budget's measurement (timed),
    and steps (the rest)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = {"eval": 0.0, "checkpoint": 0.0, "probe": 0.0}  # this session's
        self.counts = {"eval": 0, "checkpoint": 0, "probe": 0}
        self.untaken = {"eval": 0.0, "checkpoint": 0.0, "probe": 0.0}  # not yet added to the run's state
        self.marks: list[tuple[int, float]] = []  # (steps, their untimed seconds) at each check of the pace

    @contextlib.contextmanager
    def timing(self, what: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - t0
            self.seconds[what] += took
            self.untaken[what] += took
            self.counts[what] += 1

    def take(self, what: str) -> float:
        took, self.untaken[what] = self.untaken[what], 0.0
        return took

    def costs(self, steps: int, now: float, planned):
        """The costs measured in this session (the planned ones where nothing was measured): a
        step's over the later half of the steps so far, which follows a machine whose speed
        drifts (a mean over all of them still carried a 1-minute run's slower first half at its
        last check, and with it 4 s of the budget unused), an evaluation's and a checkpoint's over
        all of them."""
        from lmtrain.budget import Costs

        untimed = now - self.start - sum(self.seconds.values())  # the steps' share of the loop's time
        first_half = bisect.bisect_right(self.marks, (steps // 2, math.inf))  # marks come in step order
        since_steps, since = self.marks[first_half - 1] if first_half else (0, 0.0)
        self.marks.append((steps, untimed))
        step = (untimed - since) / max(1, steps - since_steps)
        mean = {k: self.seconds[k] / self.counts[k] if self.counts[k] else getattr(planned, k)
                for k in ("eval", "checkpoint")}
        return Costs(step, mean["eval"], mean["checkpoint"])


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
