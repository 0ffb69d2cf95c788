"""`lmtrain plan`: which model shape trains best in a time budget, on this machine.

Too big a model never sees enough tokens in the budget; too small a one saturates. ``plan``
measures this machine on candidate shapes around the config's (depth and width, the config's
context and batch), predicts the val bits per byte each would reach in the budget, and writes the
config of the best one:

1. ``candidates``: depths L-1..L+1 (not 1) and widths 0.5x..2x the config's, at its head size.
2. ``measure``: a few real training steps of each (``lmtrain.step.build_training``, synthetic
   tokens), as `lmtrain train` would run them on the configured device, each step beside one of
   the config's own shape: a ranking needs the shapes' costs relative to one another, and on a
   shared CPU those drift far less than the machine's speed does.
3. ``budget.steps_that_fit``: the steps each would get in the budget (the same arithmetic
   `train.max_minutes` uses), so tokens D = steps x tokens per step.
4. ``ScalingRule``: the predicted val bpb for N parameters (``rule_params``: the embedding table
   counted) and D tokens,

       bpb = E + A * (N / 1e6) ** -0.34 + B * (D / 1e6) ** -0.28

   Chinchilla's form and exponents (Hoffmann et al. 2022), with E, A and B fitted by least
   squares on our own measured runs of the config's optimizer (``scaling_points.json``,
   docs/speedrun.md; AdamW's when we have none of it), and a prior that pulls the compute-optimal
   ratio towards the literature's ~20 tokens per parameter (as much as one measured run would).
   The fit's leave-one-out error on those runs is printed with every plan.
5. ``choose``: the lowest predicted bpb, unless it beats the config's own shape by less than the
   error of a difference of two predictions (sqrt(2) x that error): a toss-up keeps the shape the
   config names.

The measured runs are on the embedded corpus with its 4096-token tokenizer: on other text the
absolute bpb differs, and the ranking of shapes is what the plan relies on.

When the run's shards exist, a corpus the budget would repeat many times gets what `train` would
give it (``lmtrain.small_data``: its optimiser, batch and ``train.max_epochs``) before anything is
measured, each shape's steps stop at that many epochs, and its tokens and parameters count for
what they are worth when the data repeats (``Repetition``: Muennighoff et al. 2023's form, its
constants fitted on our runs on small corpora, scripts/bench_small_corpus.py --grid).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path

import numpy as np

from lmtrain.budget import MARGIN, Costs, epoch_steps, steps_that_fit
from lmtrain.config import Config
from lmtrain.errors import ConfigError

log = logging.getLogger(__name__)

POINTS_FILE = Path(__file__).with_name("scaling_points.json")
ALPHA, BETA = 0.34, 0.28  # Chinchilla's fitted exponents for parameters and tokens
RULE_VOCAB = 4096  # the vocabulary of the measured runs: N counts the embedding table at this size
PRIOR_TOKENS_PER_PARAM = 20.0  # the compute-optimal ratio of the literature (Hoffmann et al. 2022)
CHECKPOINT_BYTES_PER_SECOND = 200e6  # for the plan's estimate of checkpoint time


# --------------------------------------------------------------------------------------------
# The scaling rule
# --------------------------------------------------------------------------------------------


def rule_params(non_embedding: int, n_embd: int) -> int:
    """N of the rule: the non-embedding parameters plus the (tied) embedding table, counted at the
    measured runs' vocabulary: at these sizes the table is most of the model, and the rule
    predicts better with it counted (docs/speedrun.md). A bigger tokenizer's table is not counted
    bigger: the rule has never seen one."""
    return non_embedding + RULE_VOCAB * n_embd


@dataclass
class ScalingRule:
    """bpb = E + A * (N/1e6)^-ALPHA + B * (D/1e6)^-BETA, N from ``rule_params``, D tokens."""

    e: float
    a: float
    b: float
    loo_error: float  # root mean square leave-one-out error on the measured runs, in bpb
    runs: int
    optimizer: str = "adamw"  # whose runs it is fitted on

    @property
    def difference_error(self) -> float:
        """The error of the difference between two shapes' predictions, each off by ~loo_error on
        its own (independently): sqrt(2) x loo_error. What a pick must beat to be more than a toss-up."""
        return math.sqrt(2) * self.loo_error

    def predict(self, params: int, tokens: int) -> float:
        """Predicted val bpb for N = ``params`` (see ``rule_params``) trained on ``tokens``."""
        return float(np.dot((self.e, self.a, self.b), _features(params, tokens)))

    def tokens_per_param(self, flops: float) -> float:
        """The compute-optimal D/N at ``flops`` (= 6 N D) under this rule."""
        best = min(np.geomspace(1e-3, 1e4, 2000), key=lambda n: self.predict(n * 1e6, flops / (6 * n * 1e6)))
        return flops / (6 * best * 1e6) / (best * 1e6)

    @classmethod
    def fit(cls, points: list[dict], optimizer: str = "adamw") -> "ScalingRule":
        """Fit on ``points`` ({"params": N, "tokens": D, "val_bpb": ...})."""
        if len(points) < 3:
            raise ConfigError(f"{POINTS_FILE}: the scaling rule needs at least 3 measured runs, has {len(points)}")
        coef = _fit(points)
        errors = [points[i]["val_bpb"] - _predict(_fit(points[:i] + points[i + 1:]), points[i]) for i in range(len(points))]
        return cls(*coef, loo_error=float(np.sqrt(np.mean(np.square(errors)))), runs=len(points), optimizer=optimizer)

    @classmethod
    @functools.lru_cache(maxsize=None)
    def ours(cls, optimizer: str = "adamw") -> "ScalingRule":
        """The rule fitted on our runs with ``optimizer``, or on the AdamW runs if we have none
        with it (``optimizer`` then says whose rule it is)."""
        measured = json.loads(POINTS_FILE.read_text("utf-8"))["optimizers"]
        name = optimizer if optimizer in measured else "adamw"
        points = [dict(p, params=rule_params(p["params"], p["n_embd"])) for p in measured[name]["points"]]
        return cls.fit(points, name)


def _features(params: float, tokens: float) -> list[float]:
    return [1.0, (params / 1e6) ** -ALPHA, (max(tokens, 1) / 1e6) ** -BETA]


def _predict(coef: tuple[float, float, float], point: dict) -> float:
    return float(np.dot(coef, _features(point["params"], point["tokens"])))


def _fit(points: list[dict]) -> tuple[float, float, float]:
    """E, A, B >= 0 by least squares, with one extra row for the prior: at the runs' median
    compute, the optimum should sit at PRIOR_TOKENS_PER_PARAM tokens per parameter. With exponents
    fixed, that optimum (dL/dN = 0 along 6ND = C) is where ALPHA * A * n^-ALPHA = BETA * B * d^-BETA
    (n, d in millions), i.e. a linear condition on A and B."""
    rows = [_features(p["params"], p["tokens"]) for p in points]
    target = [p["val_bpb"] for p in points]
    flops = float(np.median([6 * p["params"] * p["tokens"] for p in points]))
    n = math.sqrt(flops / (6 * PRIOR_TOKENS_PER_PARAM)) / 1e6
    d = PRIOR_TOKENS_PER_PARAM * n
    scale = float(np.mean([row[2] for row in rows]))  # one run's weight, in bpb
    rows.append([0.0, scale * ALPHA * n ** -ALPHA, -scale * BETA * d ** -BETA])
    target.append(0.0)
    return _nonnegative_least_squares(np.array(rows), np.array(target))


def _nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Three coefficients, each >= 0: the best of the unconstrained fits on every subset of them."""
    best, best_error = (0.0, 0.0, 0.0), float(np.sum(y ** 2))
    for size in (1, 2, 3):
        for subset in combinations(range(3), size):
            coef, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if np.all(coef >= 0):
                full = np.zeros(3)
                full[list(subset)] = coef
                error = float(np.sum((x @ full - y) ** 2))
                if error < best_error:
                    best, best_error = tuple(float(c) for c in full), error
    return best


def _repeated(amount, useful, decay):
    """``amount`` counted as what it is worth past ``useful``: U + U R* (1 - exp(-R / R*)) with
    R = amount / U - 1 (Muennighoff et al. 2023, eq. 5-6). Numbers, or numpy arrays that broadcast
    (a fit's grid of decays against its runs)."""
    repeats = np.maximum(np.asarray(amount, dtype=float) / useful - 1, 0.0)
    return np.where(amount <= useful, amount, useful + useful * decay * (1 - np.exp(-repeats / decay)))


@dataclass(frozen=True)
class Repetition:
    """What repeated data is worth: the data-constrained form of Muennighoff et al. (2023),
    "Scaling Data-Constrained Language Models" (eq. 5-6). With U unique training tokens, tokens
    seen past the first pass count for less, D' = U + U R_D* (1 - exp(-R_D / R_D*)); and
    parameters past what U can use, U_N = U / ``tokens_per_param``, count for less the same way,
    N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)). The paper's constants are R_D* = 15.4, R_N* = 5.3
    and Chinchilla's ~20 tokens per parameter; ``ours`` fits them on our small-corpus runs."""

    tokens_decay: float = 15.4  # R_D*
    params_decay: float = 5.3  # R_N*
    tokens_per_param: float = 20.0
    loo_error: float | None = None  # leave-one-out error of the fit on our runs, in bpb
    runs: int = 0  # the runs it is fitted on (0: the paper's constants)

    def tokens(self, seen: float, unique: float | None) -> float:
        """D' for ``seen`` tokens of ``unique`` (``seen`` itself when the data does not repeat)."""
        return seen if not unique else float(_repeated(seen, unique, self.tokens_decay))

    def params(self, params: float, unique: float | None) -> float:
        """N' for ``params`` (``rule_params``) trained on ``unique`` tokens."""
        return params if not unique else float(_repeated(params, unique / self.tokens_per_param, self.params_decay))

    @classmethod
    @functools.lru_cache(maxsize=None)
    def ours(cls) -> "Repetition":
        """Fitted on our small-corpus runs (``scaling_points.json``'s "repetition" points, from
        scripts/bench_small_corpus.py --grid) against the AdamW rule: the small-corpus recipe trains AdamW."""
        section = json.loads(POINTS_FILE.read_text("utf-8")).get("repetition")
        if not section or not section["points"]:
            return cls()
        return fit_repetition(section["points"], ScalingRule.ours("adamw"))


# The constants a fit searches: wide enough to hold the paper's and values far on either side.
TOKENS_DECAYS = np.geomspace(1.0, 100.0, 29)
PARAMS_DECAYS = np.geomspace(0.25, 100.0, 27)
TOKENS_PER_PARAMS = np.geomspace(0.02, 50.0, 35)


def fit_repetition(points: list[dict], rule: ScalingRule, leave_one_out: bool = True) -> Repetition:
    """R_D*, R_N* and the tokens per parameter of U_N, fitted on ``points`` ({"corpus", "params"
    (non-embedding), "n_embd", "tokens", "unique_tokens", "val_bpb"}) with the rule's A and B as
    they are and an entropy E of each corpus's own (corpora differ in how predictable they are;
    the rule ranks shapes on one): the grid point of least squared error."""
    n = np.array([rule_params(p["params"], p["n_embd"]) for p in points], dtype=float)
    d = np.array([p["tokens"] for p in points], dtype=float)
    u = np.array([p["unique_tokens"] for p in points], dtype=float)
    bpb = np.array([p["val_bpb"] for p in points], dtype=float)
    corpora = sorted({p["corpus"] for p in points})
    member = np.array([[p["corpus"] == c for p in points] for c in corpora], dtype=float)  # (corpora, points)
    grid = np.stack(np.meshgrid(TOKENS_DECAYS, PARAMS_DECAYS, TOKENS_PER_PARAMS, indexing="ij"), -1).reshape(-1, 3)
    rd, rn, k = grid[:, :1], grid[:, 1:2], grid[:, 2:]
    d_worth = _repeated(d, u, rd)
    n_worth = _repeated(n, u / k, rn)
    residual = bpb - rule.a * (n_worth / 1e6) ** -ALPHA - rule.b * (d_worth / 1e6) ** -BETA  # (grid, points)

    def best(use: np.ndarray) -> tuple[int, np.ndarray]:
        """The grid index of least error on the points in ``use``, and each corpus's E there."""
        counts = np.maximum(member[:, use].sum(1), 1)
        entropy = residual[:, use] @ member[:, use].T / counts  # (grid, corpora)
        error = ((residual[:, use] - entropy @ member[:, use]) ** 2).sum(1)
        i = int(np.argmin(error))
        return i, entropy[i]

    everything = np.ones(len(points), dtype=bool)
    i, _ = best(everything)
    loo = None
    if leave_one_out and len(points) > len(corpora) + 3:
        errors = []
        for j in range(len(points)):
            rest = everything.copy()
            rest[j] = False
            g, entropy = best(rest)
            errors.append(residual[g, j] - entropy @ member[:, j])
        loo = float(np.sqrt(np.mean(np.square(errors))))
    return Repetition(*(float(v) for v in grid[i]), loo_error=loo, runs=len(points))


# --------------------------------------------------------------------------------------------
# Candidates and their measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    n_layer: int
    n_embd: int
    n_head: int
    params: int = 0  # non-embedding
    total_params: int = 0
    step_seconds: float = 0.0
    eval_seconds: float = 0.0  # one evaluation (train.eval_batches micro-batches)
    steps: int = 0
    tokens: int = 0
    predicted_bpb: float = 0.0
    epochs: float | None = None  # passes over the run's training tokens, when its shards exist

    @property
    def rule_params(self) -> int:
        """N of the scaling rule (``rule_params``)."""
        return rule_params(self.params, self.n_embd)

    @property
    def shape(self) -> str:
        return f"{self.n_layer} x {self.n_embd}"


def candidates(config: Config) -> list[Candidate]:
    """Depths L-1..L+1 and widths 0.5x, 0.75x, 1x, 1.5x, 2x the config's, at its head size.

    No single-block shape unless the config is one: one attention layer cannot compose two
    (no induction heads, Olsson et al. 2022), and its loss follows another curve, which the rule,
    fitted across depths, rates too good (docs/speedrun.md)."""
    m = config.model
    head = m.n_embd // m.n_head
    widths = sorted({max(head, round(m.n_embd * f / head) * head) for f in (0.5, 0.75, 1.0, 1.5, 2.0)})
    depths = sorted({max(2, m.n_layer + d) for d in (-1, 1)} | {m.n_layer})
    return [Candidate(depth, width, width // head) for depth in depths for width in widths]


def shaped(config: Config, candidate: Candidate) -> Config:
    return replace(config, model=replace(config.model, n_layer=candidate.n_layer, n_embd=candidate.n_embd,
                                         n_head=candidate.n_head))


class _Stepper:
    """One shape's training step as `lmtrain train` runs it (``lmtrain.step.build_training``, on
    synthetic tokens), built once and warmed up, to be timed a step at a time (lmtrain.timing)."""

    def __init__(self, config: Config, vocab_size: int, device, precision: str):
        from lmtrain.data import SyntheticBatches
        from lmtrain.schedule import Schedule
        from lmtrain.step import build_training
        from lmtrain.timing import untimed_steps

        self.device, self.precision = device, precision
        self.training = build_training(config, vocab_size, device, precision)
        self.batches = SyntheticBatches(vocab_size, config.train.batch_size, config.model.block_size, device)
        self.schedule = Schedule.of(config.train)
        self.steps = 0
        model = self.training.model
        self.params, self.total_params = model.num_params(embeddings=False), model.num_params()
        for _ in range(untimed_steps(self.training)):
            self.step()

    def step(self) -> float:
        """Seconds of one training step."""
        from lmtrain.timing import step_seconds

        seconds = step_seconds(self.training, self.batches, self.steps, self.schedule, self.device)
        self.steps += 1
        return seconds

    def eval_micro_batch(self) -> float:
        """Seconds of one micro-batch of an evaluation (``lmtrain.evaluate.val_loss``'s forward)."""
        import torch

        from lmtrain.device import AMP_DTYPES, autocast
        from lmtrain.loss import eval_loss_fn
        from lmtrain.timing import timed

        model, (x, y) = self.training.model, self.batches.get(0, 0)

        def forward() -> None:
            model.eval()
            with torch.no_grad(), autocast(self.device, AMP_DTYPES[self.precision]):
                model(x, y, loss_fn=eval_loss_fn(self.device))
            model.train()

        return timed(self.device, forward)

    def close(self) -> None:
        del self.training
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def pace(config: Config, vocab_size: int, device, precision: str, steps: int = 3, most: int = 9,
         within: float = 1.5) -> float:
    """Seconds per training step of the config's own shape on this machine: the median of
    ``steps`` after the warm-up, or of up to ``most`` while they take under ``within`` s: a shared
    CPU's steps vary by 10-30%, and the passes counted from this pace decide small_data's dropout.
    It leaves the random state as it found it: the run that follows initialises and samples
    exactly as it would have."""
    import statistics

    from lmtrain.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    try:
        stepper = _Stepper(config, vocab_size, device, precision)
        times = []
        while len(times) < steps or (len(times) < most and sum(times) < within):
            times.append(stepper.step())
        seconds = statistics.median(times)
        stepper.close()
    finally:
        set_rng_state(saved)
    return seconds


def measure(config: Config, rows: list[Candidate], vocab_size: int, device, precision: str,
            min_seconds: float = 1.5, min_pairs: int = 6, progress: bool = True) -> float:
    """Fill in each row's step seconds and parameter counts; return the config's own step time.

    A shared CPU's speed drifts by 10-40% within a minute, so shapes timed one after the other
    can look 20-25% cheaper or dearer than they are. A ranking of shapes needs their costs
    relative to one another, and those drift far less: each candidate's steps alternate with
    steps of the config's own shape, each step is divided by its neighbour's, and the median of
    those ratios times the config's median step gives the candidate's time (at least
    ``min_pairs`` pairs, more while under ``min_seconds``; fewer pairs scatter). An evaluation
    is timed the same way, as micro-batches beside the config's steps: on a CPU a forward pass
    costs about half a training step, not the third a FLOP count says (docs/speedrun.md)."""
    from tqdm.auto import tqdm

    reference = _Stepper(config, vocab_size, device, precision)
    own = _configured(config, rows)
    reference_times, ratios = [], {}
    for row in tqdm(rows, desc="plan: measuring", unit="shape", disable=not progress, leave=False):
        if row is own:
            row.params, row.total_params, ratios[id(row)] = reference.params, reference.total_params, 1.0
            continue
        stepper = _Stepper(shaped(config, row), vocab_size, device, precision)
        pairs, start = [], time.perf_counter()
        while len(pairs) < min_pairs or (time.perf_counter() - start < min_seconds and len(pairs) < 30):
            if len(pairs) % 2:  # alternate which goes first, so neither always follows the other
                theirs, ours = stepper.step(), reference.step()
            else:
                ours, theirs = reference.step(), stepper.step()
            pairs.append((theirs, ours))
        ratios[id(row)] = statistics.median(theirs / ours for theirs, ours in pairs)
        reference_times += [ours for _, ours in pairs]
        row.params, row.total_params = stepper.params, stepper.total_params
        stepper.close()
    while len(reference_times) < 3:  # the config's shape was the only candidate
        reference_times.append(reference.step())
    reference.eval_micro_batch()  # the first pays for the switch to eval mode
    eval_share = statistics.median(reference.eval_micro_batch() / reference.step() for _ in range(3))
    reference.close()
    own_seconds = statistics.median(reference_times)
    for row in rows:
        row.step_seconds = ratios[id(row)] * own_seconds
        row.eval_seconds = eval_share * row.step_seconds * config.train.eval_batches
    return own_seconds


def fitted_steps(config: Config, row: Candidate, minutes: float) -> int:
    """The steps ``train.max_minutes`` would give this shape: its steps, plus its evaluations and
    checkpoints (weights and optimiser state, ~16 bytes a parameter)."""
    tc = config.train
    costs = Costs(step=row.step_seconds, eval=row.eval_seconds,
                  checkpoint=16 * row.total_params / CHECKPOINT_BYTES_PER_SECOND)
    return steps_that_fit(MARGIN * minutes * 60, costs, tc)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    minutes: float
    device: str
    rows: list[Candidate]
    pick: Candidate
    configured: Candidate  # the config's own shape
    rule: ScalingRule
    config: Config  # the picked shape, with train.max_minutes set
    warmup_capped: bool
    small_corpus: str | None = None  # what the small-corpus settings changed, when they apply
    repetition: Repetition = field(default_factory=Repetition.ours)  # what repeats are worth


def choose(config: Config, rows: list[Candidate], rule: ScalingRule, minutes: float,
           unique_tokens: int | None = None, repetition: Repetition | None = None) -> tuple[Candidate, list[Candidate]]:
    """Fill in each measured candidate's steps, tokens and predicted bpb (with ``unique_tokens``,
    the training split's, repeated tokens and parameters past what they can use count for less:
    ``repetition``, by default ``Repetition.ours()``). The lowest bpb
    wins if it beats the config's own shape by more than the rule's error; otherwise the config's
    shape stays (a toss-up is no reason to leave a shape the user chose, or the default we measured)."""
    from lmtrain.step import tokens_per_step as step_tokens

    tokens_per_step = step_tokens(config)
    repetition = repetition or Repetition.ours()
    cap = epoch_steps(config.train.max_epochs, unique_tokens, tokens_per_step)
    for row in rows:
        row.steps = fitted_steps(config, row, minutes)  # the shape changes no train.* setting
        if cap is not None:
            row.steps = min(row.steps, cap)
        row.tokens = row.steps * tokens_per_step
        row.epochs = row.tokens / unique_tokens if unique_tokens else None
        warm = row.steps > config.train.warmup_steps
        tokens_worth = repetition.tokens(row.tokens, unique_tokens)
        params_worth = repetition.params(row.rule_params, unique_tokens)
        row.predicted_bpb = rule.predict(params_worth, tokens_worth) if warm and row.steps > 0 else math.inf
    usable = [row for row in rows if math.isfinite(row.predicted_bpb)]
    if not usable:
        raise ConfigError(f"in {minutes:g} minutes no candidate gets past train.warmup_steps "
                          f"({config.train.warmup_steps}) on this machine: raise --minutes or lower train.warmup_steps")
    best = min(usable, key=lambda row: row.predicted_bpb)
    configured = _configured(config, usable)
    # The rule is off by ~loo_error on each of the two shapes, and a CPU's timings by 20-40%, so a
    # predicted gain smaller than the error of their difference says nothing (picks inside it
    # lost to the config's own shape; docs/speedrun.md).
    if configured is not None and best.predicted_bpb > configured.predicted_bpb - toss_up(rule, repetition, rows):
        return configured, rows
    return best, rows


def toss_up(rule: ScalingRule, repetition: Repetition, rows: list[Candidate]) -> float:
    """How much better than the config's shape another must be predicted to be picked: the error of
    a difference of two predictions, each off by the rule's leave-one-out error and, when the rows
    repeat their data, by the repetition fit's as well (on small corpora shapes rank less
    predictably: docs/performance.md)."""
    repeats = any(row.epochs is not None and row.epochs > 1 for row in rows)
    extra = (repetition.loo_error or 0.0) if repeats else 0.0
    return math.sqrt(2) * math.hypot(rule.loo_error, extra)


def _configured(config: Config, rows: list[Candidate]) -> Candidate | None:
    """The row of the config's own shape, if it is among ``rows``."""
    shape = (config.model.n_layer, config.model.n_embd)
    return next((row for row in rows if (row.n_layer, row.n_embd) == shape), None)


MAX_MINUTES = 7 * 24 * 60  # a week: the longest budget a plan is made for


def check_plan_args(minutes: float, out: Path | None, force: bool) -> None:
    """Refuse what would fail only after a minute of measuring: a budget that is not a number of
    minutes, an ``--out`` in a missing folder, onto a folder, or onto a file without ``force``."""
    if not math.isfinite(minutes) or not 0 < minutes <= MAX_MINUTES:
        raise ConfigError(f"--minutes must be a number of minutes between 0 and {MAX_MINUTES} (a week), got {minutes:g}")
    if out is None:
        return
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; the plan is one YAML file: give its path")
    if (out.exists() or out.is_symlink()) and not force:
        raise ConfigError(f"{out} exists; use --force to overwrite it")
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link; the plan replaces only a plain file")


def make_plan(config: Config, minutes: float, progress: bool = True) -> Plan:
    """Measure the candidates on the configured device and pick the best for ``minutes``."""
    from lmtrain.device import resolve_device, resolve_precision

    check_plan_args(minutes, None, False)
    device = resolve_device(config.train.device, "train.device")
    precision = resolve_precision(config.train.precision, device)
    vocab_size = _vocab_size(config)
    unique_tokens = _unique_tokens(config)
    config, small_corpus = _small_corpus(config, minutes, unique_tokens, vocab_size, device, precision)
    rule = ScalingRule.ours(config.train.optimizer)
    rows = candidates(config)
    measure(config, rows, vocab_size, device, precision, progress=progress)
    repetition = Repetition.ours()
    pick, rows = choose(config, rows, rule, minutes, unique_tokens, repetition)
    configured = _configured(config, rows)
    picked = shaped(config, pick)
    warmup = min(config.train.warmup_steps, max(1, pick.steps // 2))  # the warmup must end mid-run at the latest
    picked = replace(picked, train=replace(picked.train, max_minutes=minutes, fit_to_budget=True, warmup_steps=warmup))
    # A run directory of its own: the config's may hold checkpoints of another shape.
    suffix = f"-{pick.n_layer}x{pick.n_embd}-{minutes:g}min"
    picked = replace(picked, run=replace(picked.run, name=config.run.name + suffix, dir=str(config.run_dir) + suffix))
    return Plan(minutes, f"{device} ({precision})", rows, pick, configured, rule, picked,
                warmup != config.train.warmup_steps, small_corpus, repetition)


def _small_corpus(config: Config, minutes: float, unique_tokens: int | None, vocab_size: int, device,
                  precision: str) -> tuple[Config, str | None]:
    """The settings `lmtrain train` would choose for a corpus seen many times (``lmtrain.small_data``),
    decided before the candidates are measured, so that they are measured as they will train. The
    written config names every key, so `train` keeps what the plan chose rather than deciding again."""
    from lmtrain.small_data import small_corpus_defaults
    from lmtrain.step import tokens_per_step

    if not unique_tokens:
        return config, None
    timed = replace(config, train=replace(config.train, max_minutes=minutes, fit_to_budget=True))
    chosen, note = small_corpus_defaults(timed, unique_tokens, tokens_per_step(timed),
                                         lambda chosen: pace(chosen, vocab_size, device, precision), None)
    if note is None:
        return config, None
    return replace(chosen, train=replace(chosen.train, max_minutes=config.train.max_minutes,
                                         fit_to_budget=config.train.fit_to_budget)), note


def _unique_tokens(config: Config) -> int | None:
    """The run's training tokens, if its shards exist: what the plan counts epochs in."""
    from lmtrain.rundir import data_dir
    from lmtrain.shards import read_manifest

    if (data_dir(config.run_dir) / "manifest.json").is_file():
        return read_manifest(data_dir(config.run_dir)).splits["train"].tokens or None
    return None


def _vocab_size(config: Config) -> int:
    """The run's vocabulary if its shards exist, else the config's tokenizer size."""
    from lmtrain.rundir import data_dir
    from lmtrain.shards import read_manifest

    if (data_dir(config.run_dir) / "manifest.json").is_file():
        return read_manifest(data_dir(config.run_dir)).vocab_size
    return config.tokenizer.vocab_size


def format_plan(plan: Plan) -> str:
    """The table `lmtrain plan` prints."""
    epochs = plan.pick.epochs is not None
    lines = [f"{'shape':>9}  {'params':>7}  {'s/step':>7}  {'steps':>6}  {'tokens':>9}  {'tok/param':>9}  "
             f"{'epochs  ' if epochs else ''}{'pred. bpb':>9}"]
    for row in sorted(plan.rows, key=lambda r: (r.n_layer, r.n_embd)):
        mark = "  <- pick" if row is plan.pick else ("  (config)" if row is plan.configured else "")
        bpb = f"{row.predicted_bpb:.3f}" if math.isfinite(row.predicted_bpb) else "warmup"
        lines.append(f"{row.shape:>9}  {row.rule_params / 1e6:6.2f}M  {row.step_seconds:7.3f}  {row.steps:6d}  "
                     f"{row.tokens / 1e6:8.2f}M  {row.tokens / row.rule_params:9.1f}  "
                     f"{f'{row.epochs:6.1f}  ' if epochs else ''}{bpb:>9}{mark}")
    rule, pick = plan.rule, plan.pick
    lines.append("")
    lines.append(f"pick: {pick.shape} ({pick.n_head} heads) for {plan.minutes:g} min on {plan.device}: "
                 f"{_why(plan)}; {pick.tokens / pick.rule_params:.0f} tokens per parameter")
    flops = 6 * pick.rule_params * pick.tokens
    lines.append(f"rule: bpb = {rule.e:.3f} + {rule.a:.3f} N^-{ALPHA} + {rule.b:.3f} D^-{BETA} (N "
                 f"parameters with the embedding table at {RULE_VOCAB} tokens, D tokens, in millions), fitted on "
                 f"{rule.runs} measured {rule.optimizer} runs; compute-optimal here ~{rule.tokens_per_param(flops):.0f} "
                 f"tokens per parameter (prior {PRIOR_TOKENS_PER_PARAM:.0f})")
    margin = toss_up(rule, plan.repetition, plan.rows)
    lines.append(f"error: predictions are off by ~{margin / math.sqrt(2):.3f} bpb (leave-one-out, on our runs), a "
                 f"difference of two by ~{margin:.3f}: shapes closer than that are a toss-up")
    if plan.config.train.optimizer != rule.optimizer:
        # Another optimizer's rule is off in absolute terms and in its picks (docs/speedrun.md).
        lines.append(f"note: the rule is fitted on {rule.optimizer} runs and this config trains with "
                     f"{plan.config.train.optimizer}: its bpb figures are off, and a pick away from the config's "
                     "shape is worth a run beside it before you trust it")
    if epochs:
        lines.append(f"data: the run's {_unique_count(plan.pick.tokens / plan.pick.epochs)} training tokens are seen "
                     f"{plan.pick.epochs:.1f} times by the pick; {_repetition_line(plan.repetition)}"
                     + ("; past a few epochs, more data does more than more steps" if plan.pick.epochs > 4 else ""))
    if plan.small_corpus:
        lines.append(plan.small_corpus)
    if plan.warmup_capped:
        lines.append(f"train.warmup_steps lowered to {plan.config.train.warmup_steps} (half the planned steps)")
    return "\n".join(lines)


def _repetition_line(repetition: Repetition) -> str:
    source = (f"fitted on {repetition.runs} of our small-corpus runs, off by ~{repetition.loo_error:.3f} bpb"
              if repetition.runs else "the paper's constants")
    return (f"repeated tokens, and parameters past {1 / repetition.tokens_per_param:.2g} per unique token, count as "
            f"worth less (Muennighoff et al. 2023: R_D* = {repetition.tokens_decay:.3g}, R_N* = "
            f"{repetition.params_decay:.3g}, {source})")


def _unique_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _why(plan: Plan) -> str:
    pick, configured, rule = plan.pick, plan.configured, plan.rule
    best = min(plan.rows, key=lambda row: row.predicted_bpb)
    if pick is not configured:
        return (f"the lowest predicted val bpb, {pick.predicted_bpb:.3f}, against {configured.predicted_bpb:.3f} "
                f"for the config's {configured.shape}")
    if best is pick:
        return f"the config's own shape, the lowest predicted val bpb ({pick.predicted_bpb:.3f})"
    return (f"the config's own shape ({pick.predicted_bpb:.3f}): the best prediction, {best.shape}'s "
            f"{best.predicted_bpb:.3f}, beats it by less than the error of a difference "
            f"({toss_up(rule, plan.repetition, plan.rows):.3f})")


def write_plan(plan: Plan, out: Path, force: bool) -> None:
    """The picked config as YAML at ``out``, atomically; an existing file only with ``force``."""
    from lmtrain.fsutil import atomic_write_text, remove_stale_tmp

    check_plan_args(plan.minutes, out, force)
    remove_stale_tmp(out.parent, out.name)  # a killed plan's half-written file, provably lmtrain's
    header = (f"# lmtrain plan --minutes {plan.minutes:g}: {plan.pick.shape}, predicted val bpb "
              f"{plan.pick.predicted_bpb:.3f} (+-{plan.rule.loo_error:.3f}) on {plan.device}\n")
    atomic_write_text(out, header + plan.config.to_yaml())
