"""The learning-rate schedule a run follows: warmup, then cosine, warmup-stable-decay or constant.

A ``Schedule`` is a value: ``Schedule.of(train)`` is the one the config lays out
(``train.max_steps``, ``train.warmup_steps``, ...); under ``train.max_minutes`` the budget keeper
(lmtrain.budget) decides another one, with the step count the budget pays for, and the loop reads
it from there. The step, the logger and the checkpoints take the schedule the loop hands them;
nothing writes the decision back into the config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Schedule:
    max_steps: int  # optimiser steps in the run; the last one (max_steps - 1) is at min_lr
    warmup_steps: int  # linear warmup from 0
    kind: str  # cosine, wsd or constant
    decay_fraction: float  # wsd: the share of the steps spent decaying
    lr: float
    min_lr: float
    # Early stopping (``train.early_stop``): from step ``stop_from`` the rate falls linearly from
    # ``stop_lr`` (where the schedule stood) to ``min_lr`` at the last step, ``max_steps - 1``.
    stop_from: int | None = None
    stop_lr: float | None = None
    # A cosine whose end the budget keeper moved after its warmup (lmtrain/budget.py): from step
    # ``anchor_step`` the rest of the curve, from the point it had reached there
    # (``anchor_progress``), is spread over the steps left, so the rate goes on from where it stood
    # rather than jumping, up or down.
    anchor_step: int | None = None
    anchor_progress: float | None = None

    @classmethod
    def of(cls, tc) -> "Schedule":
        """The schedule the ``train`` section lays out."""
        return cls(tc.max_steps, tc.warmup_steps, tc.schedule, tc.decay_fraction, tc.lr, tc.min_lr)

    def with_steps(self, max_steps: int, warmup_steps: int | None = None) -> "Schedule":
        """The same schedule over ``max_steps`` steps (and ``warmup_steps``, when given)."""
        return replace(self, max_steps=max_steps,
                       warmup_steps=self.warmup_steps if warmup_steps is None else warmup_steps)

    def moved(self, step: int, max_steps: int) -> "Schedule":
        """The same schedule ending at ``max_steps``, decided after ``step`` steps. A cosine past its
        warmup goes on from the rate of step ``step`` down the rest of its curve; before the end of
        the warmup (whose rates do not depend on the end), and for wsd and constant schedules, it is
        ``with_steps``."""
        if self.kind != "cosine" or step <= self.warmup_steps:
            return self.with_steps(max_steps)
        return replace(self, max_steps=max_steps, anchor_step=step, anchor_progress=cosine_progress(step, self))

    def stopping(self, step: int, cooldown: int) -> "Schedule":
        """The schedule that ends ``cooldown`` steps after ``step``, decaying from its rate there."""
        return replace(self, max_steps=step + cooldown, stop_from=step, stop_lr=lr_at(step, self))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for first, second in (("stop_from", "stop_lr"), ("anchor_step", "anchor_progress")):
            if out[first] is None:  # as schedules were saved before early stopping and moved ends
                del out[first], out[second]
        return out


def lr_at(step: int, schedule: Schedule) -> float:
    """Learning rate for optimiser step ``step`` (0-based): warmup, then the schedule."""
    s = schedule
    if s.stop_from is not None and step >= s.stop_from:
        progress = min(1.0, (step - s.stop_from + 1) / max(1, s.max_steps - s.stop_from))
        return s.stop_lr - (s.stop_lr - s.min_lr) * progress
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return s.lr
    if s.kind == "wsd":
        decay_start = wsd_decay_start(s, s.max_steps)
        if step < decay_start:
            return s.lr
        progress = min(1.0, (step - decay_start + 1) / (s.max_steps - decay_start))
        return s.lr - (s.lr - s.min_lr) * progress
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * cosine_progress(step, s))) * (s.lr - s.min_lr)


def cosine_progress(step: int, s: Schedule) -> float:
    """How far along its cosine step ``step`` is, from 0 (the end of the warmup) to 1 (the last
    step, ``max_steps - 1``, at min_lr)."""
    if s.anchor_step is not None and step >= s.anchor_step:
        left = s.max_steps - 1 - s.anchor_step
        if left <= 0:
            return 1.0
        return min(1.0, s.anchor_progress + (1.0 - s.anchor_progress) * (step - s.anchor_step) / left)
    return min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - 1 - s.warmup_steps))


def wsd_decay_start(schedule: Schedule, max_steps: int) -> int:
    """The first (0-based) step of wsd's decay in a run of ``max_steps`` steps: the last
    ``decay_fraction`` of them, at least one."""
    return max_steps - max(1, round(schedule.decay_fraction * max_steps))
