"""A learning-rate schedule that fits ``train.max_minutes``.

Without a budget, ``train.max_steps`` lays out the schedule (warmup, stable phase, decay) and
``train.max_minutes`` would only cut it off, before the decay that is worth most at the end. With
``train.max_minutes`` set, the run decides its number of steps from the budget instead:

1. The run times its own first steps: while they are in the warmup, their learning rate does not
   depend on ``train.max_steps``, so they are training like any other and the decision can wait
   for them (``free_probe_end``: up to ``FREE_PROBE_STEPS`` steps, before the first evaluation or
   checkpoint). ``Measurer.measure`` (lmtrain/timing.py) takes their median (the first step,
   which pays for compilation and allocator growth, left out) and times one checkpoint write. A
   run whose warmup is shorter (or a run resumed past it without a decision) uses
   ``Measurer.probe`` instead, up front: it times real
   steps the same way, then puts the weights, the optimiser, the scaler and the random number
   generators back as they were, changing nothing but the decision. Either way an evaluation is
   timed on one of its micro-batches and scaled to ``eval_batches`` rather than run whole: at a
   one-minute budget a whole one would cost more than the steps it informs (with
   ``train.eval_tasks``, whose scoring a micro-batch says nothing about, one is run).
2. ``steps_that_fit`` picks the largest step count whose steps, evaluations and checkpoints fit
   in ``MARGIN`` of the time left; that count becomes the schedule's ``max_steps`` (the config's
   ``train.max_steps`` is left as written), so warmup, the stable phase and the decay all happen
   inside the budget. The warmup keeps its length
   (``train.warmup_steps``): scaled with the schedule it measured worse at a one-minute budget
   (docs/speedrun.md). A short budget wants a config with a short warmup instead.
3. The decision (the figures and the count) is recorded in the run's state: a resumed run keeps
   the same schedule, and so stays bit-exact.
4. While training, ``replan`` watches the real pace (steps with everything the loop does around
   them, over the later half of the steps so far; evaluations and checkpoints as they happen),
   every ``REPLAN_EVERY`` steps and at the last step where the end can still move later
   (``last_chance``: just before ``wsd``'s decay). If the machine turns out slower than the
   probe said, it moves the end (and with it the decay) earlier, so that the run still ends
   inside the budget with its decay done, rather than being cut off, and says so; if faster, it
   moves the end later. A cosine past its warmup goes on from the rate it has reached, down the
   rest of its curve spread over the new number of steps (``Schedule.moved``), so a move changes
   no rate already used and makes no jump; ``wsd`` moves later only before its decay (whose start
   is a share of the steps). Without that, a cosine run whose first steps were slow (the probe
   times them) kept the short schedule they planned: a 5-minute run ended at 234 s. The hard
   stop at ``train.max_minutes`` stays as the last resort.

The figures are the slowest rank's under torchrun, so every rank reaches the same decision.

``BudgetKeeper`` is this as a component of the training loop: it owns the schedule the run
follows and its own state; the loop calls it after each step. This module is arithmetic and
bookkeeping only (no torch): what it measures with is handed to it (lmtrain/timing.py).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from lmtrain.config import TrainConfig
from lmtrain.errors import CheckpointError, ConfigError
from lmtrain.schedule import Schedule, wsd_decay_start

log = logging.getLogger("lmtrain.train")

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
    # where a cosine's end last moved past its warmup: [step, progress] (``Schedule.moved``)
    anchor: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "Budget":
        warmup, anchor = saved.get("warmup_steps"), saved.get("anchor")
        if anchor is not None:
            step, progress = anchor
            anchor = [int(step), float(progress)]
            if not (0 < anchor[0] and 0.0 <= anchor[1] <= 1.0):
                raise ValueError(f"anchor {anchor}")
        return cls(float(saved["minutes"]), int(saved["max_steps"]), Costs(**saved["costs"]),
                   float(saved["probe_seconds"]), None if warmup is None else int(warmup),
                   list(saved.get("replans", [])), anchor)

    def schedule(self, base: Schedule) -> Schedule:
        """``base`` (the config's) as this decision laid it out: its steps, its warmup, and where
        its end last moved."""
        schedule = base.with_steps(self.max_steps, self.warmup_steps)
        if self.anchor is None:
            return schedule
        return replace(schedule, anchor_step=int(self.anchor[0]), anchor_progress=float(self.anchor[1]))

    def move(self, schedule: Schedule, step: int, max_steps: int) -> Schedule:
        """End at ``max_steps`` instead, decided after step ``step``: the schedule that follows
        (``Schedule.moved``), recorded so that a resumed run follows it too."""
        moved = schedule.moved(step, max_steps)
        self.max_steps = max_steps
        if moved.anchor_step is not None:
            self.anchor = [moved.anchor_step, moved.anchor_progress]
        return moved


def epoch_steps(epochs: float | None, epoch_tokens: int | None, per_step: int) -> int | None:
    """``train.max_epochs`` as a step count: the first step by which the run has seen its training
    tokens that many times (None without the key, or without a count of them)."""
    if epochs is None or not epoch_tokens:
        return None
    return max(1, math.ceil(epochs * epoch_tokens / per_step))


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


def replan(budget: Budget, pace: Costs, tc: TrainConfig, schedule: Schedule, step: int,
           seconds_spent: float) -> int | None:
    """A new last step if the rest of the run at ``pace`` would overrun the budget (earlier), or
    would leave a good part of it unused while the end can still move later (``_end_can_move``);
    else None. The loop asks after step ``step``, before
    its evaluation and checkpoint (``owed``). At ``last_chance`` any step more is taken: the end
    cannot move later after it, so there is no jitter left to guard against."""
    left = budget.minutes * 60 - seconds_spent - owed(step, pace, tc)
    if seconds_for(schedule.max_steps, pace, tc, step) > REPLAN_OVER * left:
        last = max(step + 1, steps_that_fit(REPLAN_TO * left, pace, tc, step))
        return last if last < schedule.max_steps else None
    last = steps_that_fit(MARGIN * left, pace, tc, step)
    later_by = 1.0 if step == last_chance(schedule) else REPLAN_OVER
    if last > schedule.max_steps * later_by and _end_can_move(schedule, step, last):
        return last
    return None


def replan_due(schedule: Schedule, step: int) -> bool:
    """Whether the loop checks its pace after step ``step``: every ``REPLAN_EVERY`` steps, and at
    ``last_chance``. Without the last, a run whose evaluation came in cheaper than planned, or whose
    machine sped up, finds its decay begun at the next check and leaves part of its budget unused."""
    return step % REPLAN_EVERY == 0 or step == last_chance(schedule)


def last_chance(schedule: Schedule) -> int | None:
    """The last step after which the end can still move later (``_end_can_move``): the step before
    wsd's decay; None for a cosine or a constant schedule (any step)."""
    if schedule.kind != "wsd":
        return None
    return max(schedule.warmup_steps, wsd_decay_start(schedule, schedule.max_steps)) - 1


def _end_can_move(schedule: Schedule, step: int, last: int) -> bool:
    """Whether the end can move later, to ``last``, after step ``step``: always for a cosine (the
    rest of its curve is spread over the steps left: ``Schedule.moved``) and a constant schedule;
    for wsd in its warmup or its stable phase, before either decay would begin (moving a decay
    that has begun would raise the rate again)."""
    if step < schedule.warmup_steps or schedule.kind != "wsd":
        return True
    return step < min(wsd_decay_start(schedule, schedule.max_steps), wsd_decay_start(schedule, last))


def spent(budget: dict[str, Any], step: int, tokens: int, train_seconds: float, eval_seconds: float,
          checkpoint_seconds: float) -> str:
    """How a budgeted run spent its time, for the summary line and the log."""
    b = Budget.from_dict(budget)
    steps_seconds = train_seconds - eval_seconds - checkpoint_seconds - b.probe_seconds
    moved = f"; end moved {len(b.replans)}x to the pace measured" if b.replans else ""
    return (f"budget {b.minutes:g} min: {train_seconds:.0f} s used, {step} steps ({tokens:,} tokens) in "
            f"{steps_seconds:.0f} s, eval {eval_seconds:.0f} s, checkpoints {checkpoint_seconds:.0f} s, probe "
            f"{b.probe_seconds:.0f} s{moved}")


def free_probe_end(tc: TrainConfig, schedule: Schedule, step: int) -> int | None:
    """The step after which a run starting at ``step`` decides its budget from its own timed steps,
    or None when it cannot (the steps before it must be warmup steps, and come before the first
    evaluation or checkpoint, which need the decision): then a probe runs up front."""
    end = min(step + FREE_PROBE_STEPS, schedule.warmup_steps, (step // tc.eval_every + 1) * tc.eval_every,
              (step // tc.checkpoint_every + 1) * tc.checkpoint_every)
    return end if end - step > MIN_TIMED else None


# --------------------------------------------------------------------------------------------
# The loop's clock
# --------------------------------------------------------------------------------------------


class RunClock:
    """Where this session's loop time goes: evals, checkpoints and the budget's measurement (timed),
    and steps (the rest); ``now()`` is the run's training time over every session."""

    def __init__(self, seconds_before: float = 0.0) -> None:
        self.before = seconds_before  # the run's training seconds in earlier sessions (and the probe)
        self.start = time.perf_counter()
        self.seconds = {"eval": 0.0, "checkpoint": 0.0, "probe": 0.0}  # this session's
        self.counts = {"eval": 0, "checkpoint": 0, "probe": 0}
        self.untaken = {"eval": 0.0, "checkpoint": 0.0, "probe": 0.0}  # not yet added to the run's state
        self.marks: list[tuple[int, float]] = []  # (steps, their untimed seconds) at each check of the pace

    def now(self) -> float:
        return self.before + self.elapsed()

    def elapsed(self) -> float:
        """This session's seconds."""
        return time.perf_counter() - self.start

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

    def costs(self, steps: int, now: float, planned: Costs) -> Costs:
        """The costs measured in this session (the planned ones where nothing was measured): a
        step's over the later half of the steps so far, which follows a machine whose speed
        drifts (a mean over all of them still carried a 1-minute run's slower first half at its
        last check, and with it 4 s of the budget unused), an evaluation's and a checkpoint's over
        all of them."""
        untimed = now - self.start - sum(self.seconds.values())  # the steps' share of the loop's time
        first_half = bisect.bisect_right(self.marks, (steps // 2, math.inf))  # marks come in step order
        since_steps, since = self.marks[first_half - 1] if first_half else (0, 0.0)
        self.marks.append((steps, untimed))
        step = (untimed - since) / max(1, steps - since_steps)
        mean = {k: self.seconds[k] / self.counts[k] if self.counts[k] else getattr(planned, k)
                for k in ("eval", "checkpoint")}
        return Costs(step, mean["eval"], mean["checkpoint"])


# --------------------------------------------------------------------------------------------
# The keeper: the budget as a component of the training loop
# --------------------------------------------------------------------------------------------


class Measurer(Protocol):
    """What the keeper measures with (``lmtrain.timing.Measurer`` for a training run): the costs
    of this run on this machine, and agreement across ranks. Each returns the slowest rank's."""

    def probe(self, batches, schedule: Schedule, step: int, budget_seconds: float) -> tuple[Costs, float]: ...

    def measure(self, step_seconds: list[float]) -> tuple[Costs, float]: ...

    def slowest(self, values: list[float]) -> list[float]: ...

    def any_rank(self, flag: bool) -> bool: ...


class EarlyStop:
    """``train.early_stop``: evaluations since the best val loss. When ``patience`` of them pass
    without a new best, the run should stop; ``at``/``until``/``lr`` record the decay it ends with."""

    def __init__(self, patience: int, saved: dict[str, Any] | None = None, where: str = "the checkpoint") -> None:
        self.patience = patience
        self.best: float | None = None
        self.since = 0
        self.at: int | None = None  # the step the decay began
        self.until: int | None = None  # the run's last step
        self.lr: float | None = None  # the rate the decay began at
        if saved:
            try:
                self.best, self.since = saved["best"], int(saved["since"])
                self.at, self.until, self.lr = saved.get("at"), saved.get("until"), saved.get("lr")
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{where}: early_stop is {saved!r}; the checkpoint is corrupt") from None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "since": self.since, "at": self.at, "until": self.until, "lr": self.lr}

    def due(self, val_loss: float) -> bool:
        """Count this evaluation; True the first time ``patience`` pass without a new best."""
        if self.best is None or val_loss < self.best:
            self.best, self.since = val_loss, 0
            return False
        self.since += 1
        return bool(self.patience) and self.at is None and self.since >= self.patience


class BudgetKeeper:
    """``train.max_minutes`` for the loop. It owns the schedule the run follows (``schedule``:
    the config's, until the budget decides another), the decision and its re-plans (``state_dict``,
    saved in every checkpoint, so a resumed run keeps the same schedule and stays bit-exact).

    The loop calls ``start`` once before its first step, ``after_step`` after each step (a
    decision, a check of the pace, or nothing: the keeper decides when), and asks ``out_of_time``
    whether the hard stop at ``train.max_minutes`` is due. Without a budget to fit (no
    ``train.max_minutes``, or ``train.fit_to_budget: false``) it keeps the config's schedule and
    only stops the run when the time is up."""

    def __init__(self, tc: TrainConfig, measurer: Measurer, saved: dict[str, Any] | None, step: int,
                 train_seconds: float, is_main: bool = True, where: str = "the checkpoint",
                 early_stop: dict[str, Any] | None = None, step_cap: int | None = None) -> None:
        self.tc, self.measurer, self.is_main = tc, measurer, is_main
        self.fits = tc.max_minutes is not None and tc.fit_to_budget
        self.step_cap = step_cap  # train.max_epochs in steps: no schedule runs past it
        self.schedule = Schedule.of(tc)
        if step_cap is not None and not self.fits and step_cap < self.schedule.max_steps:
            self.schedule = self.schedule.with_steps(step_cap)
        self.budget: Budget | None = None
        self.probe_end: int | None = None  # the run's own steps are timed up to here for the decision
        self.step_seconds: list[float] = []
        if saved is not None and self.fits:
            self._keep_the_recorded(saved, step, train_seconds, where)
        self.early = EarlyStop(tc.early_stop, early_stop, where)
        if self.early.at is not None:  # resumed while stopping: the same decay, to the same end
            self.schedule = replace(self.schedule, max_steps=self.early.until, stop_from=self.early.at,
                                    stop_lr=self.early.lr)

    def _keep_the_recorded(self, saved: dict[str, Any], step: int, train_seconds: float, where: str) -> None:
        """A run resumed under the same ``train.max_minutes`` keeps the step count its budget decided
        (and so its schedule); a changed budget is re-planned from the recorded costs (no new probe)."""
        try:
            budget = Budget.from_dict(saved)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{where}: budget is {saved!r}; the checkpoint is corrupt") from None
        tc = self.tc
        if budget.minutes != tc.max_minutes:
            replanned = plan(tc.max_minutes, budget.costs, tc, step, train_seconds, budget.probe_seconds)
            if self.is_main:
                log.info("train.max_minutes changed (%g -> %g): the run now ends at step %d (was %d)", budget.minutes,
                         tc.max_minutes, replanned.max_steps, budget.max_steps)
            recorded = budget.schedule(self.schedule)  # what the run has followed so far
            self.budget = replace(self._capped(replanned), warmup_steps=recorded.warmup_steps)
            self.schedule = self.budget.move(recorded, step, self.budget.max_steps)
            return
        self.budget = budget
        self.schedule = budget.schedule(self.schedule)

    def state_dict(self) -> dict[str, Any] | None:
        return self.budget.to_dict() if self.budget is not None else None

    @property
    def decided(self) -> bool:
        """Whether the run's step count is known: no budget to fit, or its decision made."""
        return not self.fits or self.budget is not None

    def early_stop_state(self) -> dict[str, Any]:
        return self.early.state_dict()

    def after_eval(self, state, val_loss: float) -> bool:
        """After an evaluation: when ``train.early_stop`` evaluations in a row found no new best,
        the run ends after a decay of ``train.decay_fraction`` of its steps so far (never later than
        it would have). True when the schedule changed."""
        if not self.early.due(val_loss):
            return False
        cooldown = max(1, round(self.tc.decay_fraction * state.step))
        end = min(self.schedule.max_steps, state.step + cooldown)
        if end <= state.step:
            return False
        self.schedule = self.schedule.stopping(state.step, end - state.step)
        self.early.at, self.early.until, self.early.lr = state.step, end, self.schedule.stop_lr
        self.probe_end = None  # the end is decided: nothing is left to time for it
        if self.is_main:
            log.info("step %d: %d evaluations without a new best val loss (best %.4f): the learning rate decays "
                     "from %.3g to train.min_lr %.3g over %d steps and the run ends at step %d (train.early_stop %d)",
                     state.step, self.early.since, self.early.best, self.schedule.stop_lr, self.schedule.min_lr,
                     end - state.step, end, self.tc.early_stop)
        return True

    def out_of_time(self, train_seconds: float) -> bool:
        return self.tc.max_minutes is not None and train_seconds >= self.tc.max_minutes * 60

    def start(self, state, batches) -> None:
        """Before the loop: the run's own first (warmup) steps will be timed for the decision, or,
        when they cannot be, a probe runs now (``state.train_seconds`` counts it). ``plan``
        refuses a budget that fits no schedule."""
        if not self.fits or self.budget is not None:
            return
        self.probe_end = free_probe_end(self.tc, self.schedule, state.step)
        if self.probe_end is None:
            costs, seconds = self.measurer.probe(batches, self.schedule, state.step,
                                                 self.tc.max_minutes * 60 - state.train_seconds)
            state.train_seconds += seconds
            self._decide(costs, seconds, f"probe {seconds:.1f} s", state)

    def after_step(self, state, step_seconds: float, clock: RunClock, start_step: int) -> bool:
        """After each step, before its evaluation and checkpoint: decide once the timed steps are
        done, or check the pace when it is due. True when the schedule changed."""
        if self.schedule.stop_from is not None:
            return False  # stopping early: the end is fixed
        if self.probe_end is not None:
            self.step_seconds.append(step_seconds)
            due = state.step >= self.probe_end or self.out_of_time(state.train_seconds)
            if self.measurer.any_rank(due):
                with clock.timing("probe"):
                    costs, seconds = self.measurer.measure(self.step_seconds)
                    self._decide(costs, seconds, f"timed over steps 2-{len(self.step_seconds)} of this run", state,
                                 spent=seconds, owes=True)
                state.train_seconds = clock.now()
                self.probe_end = None
                return True  # (no check of the pace now: it has just timed these very steps)
        if self.budget is not None and replan_due(self.schedule, state.step):
            return self._keep_within(clock, state, state.step - start_step)
        return False

    def _decide(self, costs: Costs, measuring_seconds: float, how: str, state, spent: float = 0.0,
                owes: bool = False) -> None:
        """Fix the schedule's step count to what the budget pays for at ``costs``; ``spent``:
        seconds of measuring not yet in ``state.train_seconds``; ``owes``: decided inside the loop,
        before this step's evaluation and checkpoint."""
        tc = self.tc
        budget = self._capped(plan(tc.max_minutes, costs, tc, state.step, state.train_seconds + spent,
                                   measuring_seconds, owes=owes))
        if self.is_main:
            log.info("train.max_minutes %g: %d more steps fit (%s; %s), so the schedule ends at step %d instead of "
                     "train.max_steps %d", tc.max_minutes, budget.max_steps - state.step, costs.describe(), how,
                     budget.max_steps, self.schedule.max_steps)
        self.budget = budget
        self.schedule = self.schedule.with_steps(budget.max_steps, budget.warmup_steps)

    def _capped(self, budget: Budget) -> Budget:
        """``budget``, ending at ``step_cap`` when the time would pay for more (and saying so)."""
        if self.step_cap is None or budget.max_steps <= self.step_cap:
            return budget
        if self.is_main:
            log.info("train.max_epochs %g: the run ends at step %d, where it has seen its training tokens that "
                     "many times (train.max_minutes %g would pay for %d steps)", self.tc.max_epochs, self.step_cap,
                     budget.minutes, budget.max_steps)
        return replace(budget, max_steps=self.step_cap)

    def _keep_within(self, clock: RunClock, state, steps: int) -> bool:
        """Move the end (and so the decay) to the pace measured: earlier if the run goes slower than
        its budget planned, later if it leaves time while the end can still move (``replan``)."""
        budget, planned = self.budget, self.budget.costs
        mine = clock.costs(steps, time.perf_counter(), planned)
        *figures, spent = self.measurer.slowest([mine.step, mine.eval, mine.checkpoint, state.train_seconds])
        last = replan(budget, Costs(*figures), self.tc, self.schedule, state.step, spent)
        if last is not None and self.step_cap is not None:
            last = min(last, self.step_cap)
        if last is None or last == self.schedule.max_steps:
            return False
        # The figures behind a move: a step's and an evaluation's, measured and planned (either, or
        # the margin left as the run nears its end, can move it).
        measured = f"{figures[0]:.3g} s a step, {figures[1]:.3g} s an eval; planned {planned.step:.3g}, {planned.eval:.3g}"
        if self.is_main and last < self.schedule.max_steps:
            log.warning("step %d: training runs slower than the probe measured (%s): the run now ends at step %d "
                        "instead of %d, with its decay, inside train.max_minutes %g", state.step, measured, last,
                        self.schedule.max_steps, budget.minutes)
        elif self.is_main:
            log.info("step %d: the pace measured leaves time for more steps (%s): the run now ends at step %d instead "
                     "of %d, still inside train.max_minutes %g", state.step, measured, last, self.schedule.max_steps,
                     budget.minutes)
        budget.replans.append({"at": state.step, "max_steps": last, "step_seconds": figures[0]})
        self.schedule = budget.move(self.schedule, state.step, last)
        return True

    def summary(self, state) -> str | None:
        """How the budget's time was spent, for the log; None without a budget."""
        if self.budget is None:
            return None
        return spent(self.state_dict(), state.step, state.tokens_seen, state.train_seconds, state.eval_seconds,
                     state.checkpoint_seconds)
