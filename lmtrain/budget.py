"""A learning-rate schedule that fits ``train.max_minutes``.

Without a budget, ``train.max_steps`` lays out the schedule (warmup, stable phase, decay) and
``train.max_minutes`` would only cut it off, before the decay that is worth most at the end. With
``train.max_minutes`` set, the run decides its number of steps from the budget instead:

1. The run times its own first steps: while they are in the warmup, their learning rate does not
   depend on ``train.max_steps``, so they are training like any other and the decision can wait
   for them (``free_probe_end``: up to ``FREE_PROBE_STEPS`` steps, before the first evaluation or
   checkpoint). ``measure`` takes their median (the first step, which pays for compilation and
   allocator growth, left out) and times one checkpoint write. A run whose warmup is shorter
   (or a run resumed past it without a decision) uses ``probe`` instead, up front: it times real
   steps the same way, then puts the weights, the optimiser, the scaler and the random number
   generators back as they were, changing nothing but the decision. Either way an evaluation is
   timed on one of its micro-batches and scaled to ``eval_batches`` rather than run whole: at a
   one-minute budget a whole one would cost more than the steps it informs (with
   ``train.eval_tasks``, whose scoring a micro-batch says nothing about, one is run).
2. ``steps_that_fit`` picks the largest step count whose steps, evaluations and checkpoints fit
   in ``MARGIN`` of the time left; that count becomes ``train.max_steps``, so warmup, the stable
   phase and the decay all happen inside the budget. The warmup keeps its length
   (``train.warmup_steps``): scaled with the schedule (50 warmup steps of 780 becoming 5 of 81)
   it measured 0.21 bpb worse at a one-minute budget (docs/speedrun.md, round 11). A short
   budget wants a config with a short warmup instead: the default's is 20 steps since round 15
   (50 cost a 145-step run 0.04 bpb under Muon).
3. The decision (the figures and the count) is recorded in the run's state: a resumed run keeps
   the same schedule, and so stays bit-exact.
4. While training, ``replan`` watches the real pace (steps with everything the loop does around
   them, over the later half of the steps so far; evaluations and checkpoints as they happen),
   every ``REPLAN_EVERY`` steps and at the last step where the end can still move later
   (``last_chance``: just before ``wsd``'s decay). If the machine turns out slower than the
   probe said, it moves the end (and with it the decay) earlier, so that the run still ends
   inside the budget with its decay done, rather than being cut off, and says so; if faster, it
   moves the end later, but only while that leaves the learning rate of the steps done unchanged
   (in the warmup, the stable phase of ``wsd``, or a ``constant`` schedule). The hard stop at
   ``train.max_minutes`` stays as the last resort.

The figures are the slowest rank's under torchrun, so every rank reaches the same decision.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmtrain.config import TrainConfig
from lmtrain.errors import ConfigError
from lmtrain.optim import wsd_decay_start

if TYPE_CHECKING:
    from lmtrain.train import Trainer

log = logging.getLogger(__name__)

MARGIN = 0.97  # share of the time left that the plan fills: the rest absorbs noise
FREE_PROBE_STEPS = 10  # the run's own steps timed for the decision, when its warmup is that long
MIN_TIMED = 3  # the fewest steps a measurement stands on (after the untimed first)
MIN_STEPS = 10  # the fewest steps a budget may buy: fewer make no schedule
REPLAN_EVERY = 10  # steps between checks of the pace
REPLAN_OVER = 1.02  # re-plan when the rest would take this much more than the time left ...
REPLAN_TO = 0.97  # ... and then plan the rest for this share of it


@dataclass
class Costs:
    """Seconds, on this machine, for what a run spends its time on."""

    step: float  # one optimiser step (all micro-batches, the update)
    eval: float  # one evaluation: val loss, and the tasks of train.eval_tasks
    checkpoint: float  # gathering and writing one checkpoint

    def describe(self) -> str:
        return f"{self.step:.3g} s a step, {self.eval:.3g} s an eval, {self.checkpoint:.3g} s a checkpoint"


def _multiples(every: int, start: int, end: int) -> int:
    """Multiples of ``every`` in (start, end]."""
    return end // every - start // every


def seconds_for(steps: int, costs: Costs, tc: TrainConfig, start: int = 0) -> float:
    """Time to train from step ``start`` to step ``steps`` (the last), with the loop's evals and
    checkpoints: an eval every ``eval_every`` steps and at every checkpoint, a checkpoint every
    ``checkpoint_every`` steps and at the end."""
    if steps <= start:
        return 0.0
    e, c = tc.eval_every, tc.checkpoint_every
    both = e * c // math.gcd(e, c)
    saves = _multiples(c, start, steps) + (steps % c != 0)
    evals = _multiples(e, start, steps) + _multiples(c, start, steps) - _multiples(both, start, steps)
    evals += steps % e != 0 and steps % c != 0
    return (steps - start) * costs.step + evals * costs.eval + saves * costs.checkpoint


def steps_that_fit(seconds: float, costs: Costs, tc: TrainConfig, start: int = 0) -> int:
    """The last step of the longest run from ``start`` that ``seconds`` pays for (``start`` when
    not even one step fits)."""
    low, high = start, start + int(seconds / max(costs.step, 1e-9)) + 1
    while low < high:  # seconds_for grows with the step count: bisect
        mid = (low + high + 1) // 2
        if seconds_for(mid, costs, tc, start) <= seconds:
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class Budget:
    """The decision, as the run's state records it (``TrainState.budget``)."""

    minutes: float
    max_steps: int
    costs: Costs
    probe_seconds: float  # spent measuring, counted against the budget
    warmup_steps: int | None = None  # the warmup the schedule was planned with (None: the config's)
    replans: list[dict[str, Any]] = field(default_factory=list)  # {"at", "max_steps", "step_seconds"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "Budget":
        warmup = saved.get("warmup_steps")
        return cls(float(saved["minutes"]), int(saved["max_steps"]), Costs(**saved["costs"]),
                   float(saved["probe_seconds"]), None if warmup is None else int(warmup),
                   list(saved.get("replans", [])))


def owed(step: int, costs: Costs, tc: TrainConfig) -> float:
    """Seconds of the evaluation and checkpoint that step ``step`` still owes when the loop decides
    right after it: it decides (and re-decides) between a step and that step's evaluation and
    checkpoint, which ``seconds_for`` counts from the next step on. Left out, they made a run
    re-planned at step 100 of a 1-minute budget move its end from 137 to 145 steps (3 s of
    evaluation it did not see coming), and back to 137 ten steps later."""
    if step <= 0:
        return 0.0
    saves = step % tc.checkpoint_every == 0
    evaluates = saves or step % tc.eval_every == 0
    return evaluates * costs.eval + saves * costs.checkpoint


def plan(minutes: float, costs: Costs, tc: TrainConfig, step: int, seconds_spent: float,
         probe_seconds: float, owes: bool = False) -> Budget:
    """The step count ``minutes`` pays for, from step ``step`` with ``seconds_spent`` of them
    gone (``owes``: decided after step ``step`` and before its evaluation and checkpoint); a
    ``ConfigError`` when that is too few steps for a schedule (``MIN_STEPS``) or the warmup would
    not end."""
    left = minutes * 60 - seconds_spent - (owed(step, costs, tc) if owes else 0.0)
    last = steps_that_fit(MARGIN * left, costs, tc, step)
    warmup = tc.warmup_steps
    if last - step < MIN_STEPS or last <= warmup:
        raise ConfigError(
            f"train.max_minutes {minutes:g} leaves time for {max(0, last - step)} steps on this machine "
            f"({costs.describe()}, measured): too few for a schedule, which needs more than train.warmup_steps "
            f"({tc.warmup_steps}) and at least {MIN_STEPS}; raise train.max_minutes, or lower train.warmup_steps, "
            "train.batch_size or the model size")
    return Budget(minutes, last, costs, probe_seconds, warmup)


def replan(budget: Budget, pace: Costs, tc: TrainConfig, step: int, seconds_spent: float) -> int | None:
    """A new last step if the rest of the run at ``pace`` would overrun the budget (earlier), or
    would leave a good part of it unused while the end can still move without changing the
    learning rate of the steps done (later); else None. The loop asks after step ``step``, before
    its evaluation and checkpoint (``owed``). At ``last_chance`` any step more is taken: the end
    cannot move later after it, so there is no jitter left to guard against."""
    left = budget.minutes * 60 - seconds_spent - owed(step, pace, tc)
    if seconds_for(tc.max_steps, pace, tc, step) > REPLAN_OVER * left:
        last = max(step + 1, steps_that_fit(REPLAN_TO * left, pace, tc, step))
        return last if last < tc.max_steps else None
    last = steps_that_fit(MARGIN * left, pace, tc, step)
    later_by = 1.0 if step == last_chance(tc) else REPLAN_OVER
    if last > tc.max_steps * later_by and _end_can_move(tc, step, last):
        return last
    return None


def replan_due(tc: TrainConfig, step: int) -> bool:
    """Whether the loop checks its pace after step ``step``: every ``REPLAN_EVERY`` steps, and at
    ``last_chance``. Without the last, a run whose evaluation came in cheaper than planned, or whose
    machine sped up, found its decay begun at the next check and ended 4 s (10 steps) inside a
    1-minute budget (docs/speedrun.md, round 17)."""
    return step % REPLAN_EVERY == 0 or step == last_chance(tc)


def last_chance(tc: TrainConfig) -> int | None:
    """The last step after which the end can still move later (``_end_can_move``): the step before
    wsd's decay, or the last of the warmup for a cosine; None for a constant schedule (any step)."""
    if tc.schedule == "constant":
        return None
    if tc.schedule == "wsd":
        return max(tc.warmup_steps, wsd_decay_start(tc, tc.max_steps)) - 1
    return tc.warmup_steps - 1


def _end_can_move(tc: TrainConfig, step: int, last: int) -> bool:
    """Whether moving the end to ``last`` leaves the learning rate up to step ``step`` as it was:
    in the warmup, in a constant schedule, or in the stable phase of wsd (before either decay)."""
    if step < tc.warmup_steps or tc.schedule == "constant":
        return True
    if tc.schedule == "wsd":
        return step < min(wsd_decay_start(tc, tc.max_steps), wsd_decay_start(tc, last))
    return False


def spent(budget: dict[str, Any], step: int, tokens: int, train_seconds: float, eval_seconds: float,
          checkpoint_seconds: float) -> str:
    """How a budgeted run spent its time, for the summary line and the log."""
    b = Budget.from_dict(budget)
    steps_seconds = train_seconds - eval_seconds - checkpoint_seconds - b.probe_seconds
    moved = f"; end moved {len(b.replans)}x to the pace measured" if b.replans else ""
    return (f"budget {b.minutes:g} min: {train_seconds:.0f} s used, {step} steps ({tokens:,} tokens) in "
            f"{steps_seconds:.0f} s, eval {eval_seconds:.0f} s, checkpoints {checkpoint_seconds:.0f} s, probe "
            f"{b.probe_seconds:.0f} s{moved}")


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def free_probe_end(tc: TrainConfig, step: int) -> int | None:
    """The step after which a run starting at ``step`` decides its budget from its own timed steps,
    or None when it cannot (the steps before it must be warmup steps, and come before the first
    evaluation or checkpoint, which need the decision): then ``probe`` runs up front."""
    end = min(step + FREE_PROBE_STEPS, tc.warmup_steps, (step // tc.eval_every + 1) * tc.eval_every,
              (step // tc.checkpoint_every + 1) * tc.checkpoint_every)
    return end if end - step > MIN_TIMED else None


def measure(trainer: "Trainer", step_seconds: list[float]) -> tuple[Costs, float]:
    """The costs from the run's own timed steps (the first, which pays for compilation, left
    out), with an evaluation and a checkpoint timed; the costs (the slowest rank's) and the
    seconds this took."""
    from lmtrain import distributed as dist_util

    began, step = time.perf_counter(), statistics.median(step_seconds[1:] or step_seconds)
    eval_seconds, checkpoint_seconds = _eval_and_checkpoint(trainer)
    *figures, took = dist_util.max_over_ranks([step, eval_seconds, checkpoint_seconds, time.perf_counter() - began],
                                              trainer.info, trainer.device)
    return Costs(*figures), took


def _eval_and_checkpoint(trainer: "Trainer") -> tuple[float, float]:
    """An evaluation's seconds (from one micro-batch; a whole one when ``train.eval_tasks`` scores
    tasks, which a micro-batch says nothing about) and a checkpoint's (timed, written to scratch)."""
    from lmtrain.device import synchronize

    if trainer.tasks:
        t0 = time.perf_counter()
        trainer.evaluate_quietly()
        synchronize(trainer.device)
        eval_seconds = time.perf_counter() - t0
    else:
        eval_seconds = _timed_eval_seconds(trainer)
    t0 = time.perf_counter()
    _time_a_checkpoint(trainer)
    return eval_seconds, time.perf_counter() - t0


def _timed_eval_seconds(trainer: "Trainer") -> float:
    """An evaluation's seconds: one of its micro-batches timed (after one untimed, which pays for a
    compiled model's switch to eval mode), times the micro-batches each rank scores. A forward pass
    costs more than the third of a training step that a FLOP count says on a CPU
    (a micro-batch's forward took 125-155 ms against a 220-300 ms step on a 2 x 96 model, so an
    evaluation estimated at 1.5 s took 3.3 s), and a run that underestimates its evaluations
    overruns its budget by the difference."""
    from lmtrain.device import synchronize

    trainer.evaluate_quietly(micro_batches=1)
    synchronize(trainer.device)
    t0 = time.perf_counter()
    trainer.evaluate_quietly(micro_batches=1)
    synchronize(trainer.device)
    per_rank = trainer.tc.batch_size * trainer.info.world_size
    return (time.perf_counter() - t0) * math.ceil(len(trainer.val_positions) / per_rank)


def probe(trainer: "Trainer", batches, budget_seconds: float) -> tuple[Costs, float]:
    """Time real steps, one eval and one checkpoint of ``trainer`` on this machine, and leave its
    state as it was; return the costs (the slowest rank's) and the seconds the probe took."""
    from lmtrain import distributed as dist_util
    from lmtrain.device import synchronize

    training, device, start_step = trainer.training, trainer.device, trainer.state.step
    began = time.perf_counter()
    saved = _Saved.take(training)
    try:
        # Warm-up steps pay for compilation, allocator growth and caches; they are not timed.
        for i in range(2 if training.runner.forward_model is not training.model else 1):
            training.runner.run(start_step + i, batches)
        synchronize(device)
        t0, times, more = time.perf_counter(), [], True
        # At least 3 timed steps, and more while they cost under 2% of the budget (at most 10 s);
        # under torchrun every rank runs as many as the slowest wants (a step is a collective).
        while more:
            began_step = time.perf_counter()
            training.runner.run(start_step + 2 + len(times), batches)
            synchronize(device)
            times.append(time.perf_counter() - began_step)
            more = len(times) < 3 or (time.perf_counter() - t0 < min(0.02 * budget_seconds, 10.0) and len(times) < 50)
            more = dist_util.any_rank(more, trainer.info, device)
        step_seconds = statistics.median(times)  # a slow outlier (the OS, a page fault) is not the pace
        eval_seconds, checkpoint_seconds = _eval_and_checkpoint(trainer)
    finally:
        saved.restore(training)
    *figures, took = dist_util.max_over_ranks([step_seconds, eval_seconds, checkpoint_seconds,
                                               time.perf_counter() - began], trainer.info, device)
    return Costs(*figures), took


def _time_a_checkpoint(trainer: "Trainer") -> None:
    """Gather and write what a checkpoint holds, into a scratch directory that is then removed."""
    from lmtrain import distributed as dist_util
    from lmtrain.checkpoint import save_weights, weights_for_saving

    weights, optimizer_state = trainer.training.snapshot(keep=trainer.info.is_main)
    if trainer.info.is_main:
        scratch = trainer.checkpointer.directory / ".budget-probe.tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            save_weights(weights_for_saving(weights, trainer.model.config.tie_embeddings), scratch / "w", {})
            torch.save(optimizer_state, scratch / "o")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    dist_util.barrier(trainer.info)


@dataclass
class _Saved:
    """Everything a probe's steps change, to put back: weights, optimiser, scaler, RNG."""

    weights: dict
    optimizer: dict
    scaler: dict
    rng: dict

    @classmethod
    def take(cls, training) -> "_Saved":
        from lmtrain.checkpoint import rng_state

        weights = {k: v.detach().clone() for k, v in training.model.state_dict().items()}
        return cls(weights, copy.deepcopy(training.optimizer.state_dict()), copy.deepcopy(training.scaler.state_dict()),
                   rng_state())

    def restore(self, training) -> None:
        from lmtrain.checkpoint import set_rng_state

        training.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            training.model.load_state_dict(self.weights)
        training.optimizer.load_state_dict(self.optimizer)
        training.scaler.load_state_dict(self.scaler)
        set_rng_state(self.rng)
