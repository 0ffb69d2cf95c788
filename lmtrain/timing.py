"""Timing training on this machine: a step, an evaluation, a checkpoint.

Three users need the same figures: the time budget (``train.max_minutes``, lmtrain/budget.py:
``Measurer`` times the run's own steps, or probes, and an evaluation and a checkpoint), ``lmtrain
plan`` (ranks model shapes by their step time) and scripts/bench_train.py. Every figure is taken
the same way: the device synchronised at both ends, and the first step of a model (two when it is
compiled: compilation, allocator growth, caches) left untimed.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmtrain import distributed as dist_util
from lmtrain.budget import Costs
from lmtrain.checkpoint import rng_state, save_weights, set_rng_state, weights_for_saving
from lmtrain.device import synchronize
from lmtrain.schedule import Schedule, lr_at


def untimed_steps(training) -> int:
    """Steps that pay for compilation, allocator growth and caches, before any is timed."""
    return 2 if training.runner.forward_model is not training.model else 1


def timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds ``work()`` takes, the device synchronised after it (and before: nothing queued
    earlier is counted)."""
    synchronize(device)
    began = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - began


def step_seconds(training, batches, step: int, schedule: Schedule, device: torch.device) -> float:
    """Seconds of training step ``step`` (``training``: a ``step.Training``)."""
    return timed(device, lambda: training.runner.run(step, batches, lr_at(step, schedule)))


def checkpoint_seconds(training, scratch: Path, info: dist_util.DistInfo) -> float:
    """Seconds to gather and write what a checkpoint holds, into ``scratch`` (removed after)."""
    began = time.perf_counter()
    weights, optimizer_state = training.snapshot(keep=info.is_main)
    if info.is_main:
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            save_weights(weights_for_saving(weights, training.model.config.tie_embeddings), scratch / "w", {})
            torch.save(optimizer_state, scratch / "o")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    dist_util.barrier(info)
    return time.perf_counter() - began


class Measurer:
    """The costs of one training run on this machine, for its budget (``budget.BudgetKeeper``):
    ``training`` (a ``step.Training``), ``validator`` (an ``evaluate.Validator``), and where a
    scratch checkpoint may be written. Every figure is the slowest rank's under torchrun, so every
    rank reaches the same decision."""

    def __init__(self, training, validator, checkpoints: Path, info: dist_util.DistInfo,
                 device: torch.device) -> None:
        self.training, self.validator, self.info, self.device = training, validator, info, device
        self.scratch = checkpoints / ".budget-probe.tmp"

    def slowest(self, values: list[float]) -> list[float]:
        return dist_util.max_over_ranks(values, self.info, self.device)

    def any_rank(self, flag: bool) -> bool:
        return dist_util.any_rank(flag, self.info, self.device)

    def measure(self, step_seconds: list[float]) -> tuple[Costs, float]:
        """The costs from the run's own timed steps (the first, which pays for compilation, left
        out), with an evaluation and a checkpoint timed; the costs and the seconds this took."""
        began, step = time.perf_counter(), statistics.median(step_seconds[1:] or step_seconds)
        eval_seconds, checkpoint = self._eval_and_checkpoint()
        *figures, took = self.slowest([step, eval_seconds, checkpoint, time.perf_counter() - began])
        return Costs(*figures), took

    def probe(self, batches, schedule: Schedule, start_step: int, budget_seconds: float) -> tuple[Costs, float]:
        """Time real steps, one eval and one checkpoint, and leave the training state as it was
        (weights, optimiser, scaler, RNG): the costs and the seconds the probe took."""
        training, device = self.training, self.device
        began = time.perf_counter()
        saved = _Saved.take(training)
        try:
            for i in range(untimed_steps(training)):
                training.runner.run(start_step + i, batches, lr_at(start_step + i, schedule))
            t0, times, more = time.perf_counter(), [], True
            # At least 3 timed steps, and more while they cost under 2% of the budget (at most 10 s);
            # under torchrun every rank runs as many as the slowest wants (a step is a collective).
            while more:
                times.append(step_seconds(training, batches, start_step + 2 + len(times), schedule, device))
                more = len(times) < 3 or (time.perf_counter() - t0 < min(0.02 * budget_seconds, 10.0) and len(times) < 50)
                more = dist_util.any_rank(more, self.info, device)
            step = statistics.median(times)  # a slow outlier (the OS, a page fault) is not the pace
            eval_seconds, checkpoint = self._eval_and_checkpoint()
        finally:
            saved.restore(training)
        *figures, took = self.slowest([step, eval_seconds, checkpoint, time.perf_counter() - began])
        return Costs(*figures), took

    def _eval_and_checkpoint(self) -> tuple[float, float]:
        """An evaluation's seconds (from one micro-batch; a whole one when ``train.eval_tasks`` scores
        tasks, which a micro-batch says nothing about) and a checkpoint's (timed, written to scratch)."""
        validator = self.validator
        if validator.tasks:
            eval_seconds = timed(self.device, validator.quietly)
        else:
            # One micro-batch timed (after one untimed, which pays for a compiled model's switch to
            # eval mode), times the micro-batches each rank scores. A forward pass costs more than
            # the third of a training step that a FLOP count says on a CPU (a micro-batch's forward
            # took 125-155 ms against a 220-300 ms step on a 2 x 96 model), and a run that
            # underestimates its evaluations overruns its budget by the difference.
            validator.quietly(micro_batches=1)
            eval_seconds = timed(self.device, lambda: validator.quietly(micro_batches=1)) * validator.micro_batches
        return eval_seconds, checkpoint_seconds(self.training, self.scratch, self.info)


@dataclass
class _Saved:
    """Everything a probe's steps change, to put back: weights, optimiser, scaler, RNG."""

    weights: dict
    optimizer: dict
    scaler: dict
    rng: dict

    @classmethod
    def take(cls, training) -> "_Saved":
        weights = {k: v.detach().clone() for k, v in training.model.state_dict().items()}
        return cls(weights, copy.deepcopy(training.optimizer.state_dict()), copy.deepcopy(training.scaler.state_dict()),
                   rng_state())

    def restore(self, training) -> None:
        training.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            training.model.load_state_dict(self.weights)
        training.optimizer.load_state_dict(self.optimizer)
        training.scaler.load_state_dict(self.scaler)
        set_rng_state(self.rng)
