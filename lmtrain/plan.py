"""`lmtrain plan`: which model shape trains best in a time budget, on this machine.

Too big a model never sees enough tokens in the budget; too small a one saturates. ``plan``
measures this machine on candidate shapes around the config's (depth and width, the config's
context and batch), predicts the val bits per byte each would reach in the budget, and writes the
config of the best one:

1. ``candidates``: depths L-1..L+1 and widths 0.5x..2x the config's, at the config's head size.
2. ``measure``: a few real training steps of each (``lmtrain.step.build_training``, synthetic
   tokens), as `lmtrain train` would run them on the configured device.
3. ``budget.steps_that_fit``: the steps each would get in the budget (the same arithmetic
   `train.max_minutes` uses), so tokens D = steps x tokens per step.
4. ``ScalingRule``: the predicted val bpb for N non-embedding parameters and D tokens,

       bpb = E + A * (N / 1e6) ** -0.34 + B * (D / 1e6) ** -0.28

   Chinchilla's form and exponents (Hoffmann et al. 2022), with E, A and B fitted by least
   squares on our own speedrun runs (``scaling_points.json``, docs/speedrun.md), and a prior that
   pulls the compute-optimal ratio towards the literature's ~20 tokens per parameter (as much as
   one measured run would). The fit's leave-one-out error on those runs is printed with every plan.
5. ``choose``: the lowest predicted bpb, unless it beats the config's own shape by less than the
   error of a difference of two predictions (sqrt(2) x that error): a toss-up keeps the shape the
   config names.

The measured runs are on the embedded corpus with its 4096-token tokenizer: on other text the
absolute bpb differs, and the ranking of shapes is what the plan relies on.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np

from lmtrain.budget import MARGIN, Costs, estimated_eval_seconds, steps_that_fit
from lmtrain.config import Config
from lmtrain.errors import ConfigError

log = logging.getLogger(__name__)

POINTS_FILE = Path(__file__).with_name("scaling_points.json")
ALPHA, BETA = 0.34, 0.28  # Chinchilla's fitted exponents for parameters and tokens
PRIOR_TOKENS_PER_PARAM = 20.0  # the compute-optimal ratio of the literature (Hoffmann et al. 2022)
MEASURE_ROUNDS = 2  # on a CPU: each shape's step is timed this many times, the fastest kept
CHECKPOINT_BYTES_PER_SECOND = 200e6  # for the plan's estimate of checkpoint time


# --------------------------------------------------------------------------------------------
# The scaling rule
# --------------------------------------------------------------------------------------------


@dataclass
class ScalingRule:
    """bpb = E + A * (N/1e6)^-ALPHA + B * (D/1e6)^-BETA, N non-embedding parameters, D tokens."""

    e: float
    a: float
    b: float
    loo_error: float  # root mean square leave-one-out error on the measured runs, in bpb
    runs: int

    @property
    def difference_error(self) -> float:
        """The error of the difference between two shapes' predictions, each off by ~loo_error on
        its own (independently): sqrt(2) x loo_error. What a pick must beat to be more than a toss-up."""
        return math.sqrt(2) * self.loo_error

    def predict(self, params: int, tokens: int) -> float:
        return self.e + self.a * (params / 1e6) ** -ALPHA + self.b * (max(tokens, 1) / 1e6) ** -BETA

    def tokens_per_param(self, flops: float) -> float:
        """The compute-optimal D/N at ``flops`` (= 6 N D) under this rule."""
        best = min(np.geomspace(1e-3, 1e4, 2000), key=lambda n: self.predict(n * 1e6, flops / (6 * n * 1e6)))
        return flops / (6 * best * 1e6) / (best * 1e6)

    @classmethod
    def fit(cls, points: list[dict]) -> "ScalingRule":
        if len(points) < 3:
            raise ConfigError(f"{POINTS_FILE}: the scaling rule needs at least 3 measured runs, has {len(points)}")
        coef = _fit(points)
        errors = [points[i]["val_bpb"] - _predict(_fit(points[:i] + points[i + 1:]), points[i]) for i in range(len(points))]
        return cls(*coef, loo_error=float(np.sqrt(np.mean(np.square(errors)))), runs=len(points))

    @classmethod
    def ours(cls) -> "ScalingRule":
        return cls.fit(json.loads(POINTS_FILE.read_text("utf-8"))["points"])


def _features(params: float, tokens: float) -> list[float]:
    return [1.0, (params / 1e6) ** -ALPHA, (tokens / 1e6) ** -BETA]


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
    steps: int = 0
    tokens: int = 0
    predicted_bpb: float = 0.0

    @property
    def shape(self) -> str:
        return f"{self.n_layer} x {self.n_embd}"


def candidates(config: Config) -> list[Candidate]:
    """Depths L-1..L+1 and widths 0.5x, 0.75x, 1x, 1.5x, 2x the config's, at its head size."""
    m = config.model
    head = m.n_embd // m.n_head
    widths = sorted({max(head, round(m.n_embd * f / head) * head) for f in (0.5, 0.75, 1.0, 1.5, 2.0)})
    depths = sorted({max(1, m.n_layer + d) for d in (-1, 0, 1)})
    return [Candidate(depth, width, width // head) for depth in depths for width in widths]


def shaped(config: Config, candidate: Candidate) -> Config:
    return replace(config, model=replace(config.model, n_layer=candidate.n_layer, n_embd=candidate.n_embd,
                                         n_head=candidate.n_head))


def measure(config: Config, vocab_size: int, device, precision: str, steps: int = 3,
            min_seconds: float = 1.0) -> tuple[float, int, int]:
    """Seconds per training step of ``config``'s model on ``device`` (the median of at least
    ``steps`` real steps on synthetic tokens, more while under ``min_seconds``), and its
    non-embedding and total parameter counts."""
    import torch

    from lmtrain.data import SyntheticBatches
    from lmtrain.device import synchronize
    from lmtrain.step import build_training

    training = build_training(config, vocab_size, device, precision)
    batches = SyntheticBatches(vocab_size, config.train.batch_size, config.model.block_size, device)
    warm = 2 if training.runner.forward_model is not training.model else 1
    for step in range(warm):
        training.runner.run(step, batches)
    synchronize(device)
    start, times = time.perf_counter(), []
    while len(times) < steps or (time.perf_counter() - start < min_seconds and len(times) < 20):
        began = time.perf_counter()
        training.runner.run(warm + len(times), batches)
        synchronize(device)
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times)  # a step the OS slowed down is not the shape's pace
    model = training.model
    counts = model.num_params(embeddings=False), model.num_params()
    del training, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, counts[0], counts[1]


def fitted_steps(config: Config, step_seconds: float, params: int, minutes: float) -> int:
    """The steps ``train.max_minutes`` would give this shape: its steps, plus its evals (estimated
    as the budget's probe does) and checkpoints."""
    tc = config.train
    costs = Costs(step=step_seconds, eval=estimated_eval_seconds(step_seconds, tc),
                  checkpoint=16 * params / CHECKPOINT_BYTES_PER_SECOND)
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


def choose(config: Config, rows: list[Candidate], rule: ScalingRule, minutes: float) -> tuple[Candidate, list[Candidate]]:
    """Fill in each measured candidate's steps, tokens and predicted bpb. The lowest bpb wins if
    it beats the config's own shape by more than the rule's error; otherwise the config's shape
    stays (a toss-up is no reason to leave a shape the user chose, or the default we measured)."""
    tokens_per_step = config.train.batch_size * config.train.grad_accum * config.model.block_size
    for row in rows:
        row.steps = fitted_steps(shaped(config, row), row.step_seconds, row.total_params, minutes)
        row.tokens = row.steps * tokens_per_step
        warm = row.steps > config.train.warmup_steps
        row.predicted_bpb = rule.predict(row.params, row.tokens) if warm and row.steps > 0 else math.inf
    usable = [row for row in rows if math.isfinite(row.predicted_bpb)]
    if not usable:
        raise ConfigError(f"in {minutes:g} minutes no candidate gets past train.warmup_steps "
                          f"({config.train.warmup_steps}) on this machine: raise --minutes or lower train.warmup_steps")
    best = min(usable, key=lambda row: row.predicted_bpb)
    configured = _configured(config, usable)
    # Rounds 13 and 15 (docs/speedrun.md): plans that moved to a shape predicted 0.01-0.027 better
    # lost by 0.03-0.06 to the config's own shape; picks predicted 0.039-0.053 better won. The
    # rule is off by ~loo_error on each of the two shapes, and a CPU's timings by 20-40% (round
    # 15's 3 x 64 ran 25% slower than its plan timed it), so a smaller predicted gain says nothing.
    if configured is not None and best.predicted_bpb > configured.predicted_bpb - rule.difference_error:
        return configured, rows
    return best, rows


def _configured(config: Config, rows: list[Candidate]) -> Candidate | None:
    """The row of the config's own shape, if it is among ``rows``."""
    shape = (config.model.n_layer, config.model.n_embd)
    return next((row for row in rows if (row.n_layer, row.n_embd) == shape), None)


def make_plan(config: Config, minutes: float, progress: bool = True) -> Plan:
    """Measure the candidates on the configured device and pick the best for ``minutes``."""
    from tqdm.auto import tqdm

    from lmtrain.device import resolve_device, resolve_precision

    rule = ScalingRule.ours()
    device = resolve_device(config.train.device, "train.device")
    precision = resolve_precision(config.train.precision, device)
    vocab_size = _vocab_size(config)
    rows = candidates(config)
    # A shared CPU's speed drifts by 10-40% within a minute, and a shape measured in a slow
    # moment looked 20% cheaper or dearer than its neighbours (3 x 96 measured at 0.38, 0.46 and
    # 0.55 s a step by three plans in a row, and picked once for it). So on a CPU every shape is
    # measured twice, in two rounds, and keeps its faster figure: drift only ever slows a step.
    # That narrows the spread without removing it (docs/speedrun.md, round 13). Each round times
    # for half as long, so a plan takes the time it took with one.
    rounds = MEASURE_ROUNDS if device.type == "cpu" else 1
    with tqdm(total=rounds * len(rows), desc="plan: measuring", unit="shape", disable=not progress, leave=False) as bar:
        for _ in range(rounds):
            for row in rows:
                seconds, row.params, row.total_params = measure(shaped(config, row), vocab_size, device, precision,
                                                                min_seconds=1.0 / rounds)
                row.step_seconds = min(seconds, row.step_seconds or math.inf)
                bar.update()
    pick, rows = choose(config, rows, rule, minutes)
    configured = _configured(config, rows)
    picked = shaped(config, pick)
    warmup = min(config.train.warmup_steps, max(1, pick.steps // 2))  # the warmup must end mid-run at the latest
    picked = replace(picked, train=replace(picked.train, max_minutes=minutes, fit_to_budget=True, warmup_steps=warmup))
    # A run directory of its own: the config's may hold checkpoints of another shape.
    suffix = f"-{pick.n_layer}x{pick.n_embd}-{minutes:g}min"
    picked = replace(picked, run=replace(picked.run, name=config.run.name + suffix, dir=str(config.run_dir) + suffix))
    return Plan(minutes, f"{device} ({precision})", rows, pick, configured, rule, picked,
                warmup != config.train.warmup_steps)


def _vocab_size(config: Config) -> int:
    """The run's vocabulary if its shards exist, else the config's tokenizer size."""
    from lmtrain.rundir import data_dir
    from lmtrain.shards import read_manifest

    if (data_dir(config.run_dir) / "manifest.json").is_file():
        return read_manifest(data_dir(config.run_dir)).vocab_size
    return config.tokenizer.vocab_size


def format_plan(plan: Plan) -> str:
    """The table `lmtrain plan` prints."""
    lines = [f"{'shape':>9}  {'params':>7}  {'s/step':>7}  {'steps':>6}  {'tokens':>9}  {'tok/param':>9}  "
             f"{'pred. bpb':>9}"]
    for row in sorted(plan.rows, key=lambda r: (r.n_layer, r.n_embd)):
        mark = "  <- pick" if row is plan.pick else ("  (config)" if row is plan.configured else "")
        bpb = f"{row.predicted_bpb:.3f}" if math.isfinite(row.predicted_bpb) else "warmup"
        lines.append(f"{row.shape:>9}  {row.params / 1e6:6.2f}M  {row.step_seconds:7.3f}  {row.steps:6d}  "
                     f"{row.tokens / 1e6:8.2f}M  {row.tokens / max(row.params, 1):9.1f}  {bpb:>9}{mark}")
    rule, pick = plan.rule, plan.pick
    lines.append("")
    lines.append(f"pick: {pick.shape} ({pick.n_head} heads) for {plan.minutes:g} min on {plan.device}: "
                 f"{_why(plan)}; {pick.tokens / max(pick.params, 1):.0f} tokens per parameter")
    flops = 6 * pick.params * pick.tokens
    lines.append(f"rule: bpb = {rule.e:.3f} + {rule.a:.3f} N^-{ALPHA} + {rule.b:.3f} D^-{BETA} (N, D in millions), "
                 f"fitted on {rule.runs} measured runs; compute-optimal here ~{rule.tokens_per_param(flops):.0f} tokens "
                 f"per parameter (prior {PRIOR_TOKENS_PER_PARAM:.0f})")
    lines.append(f"error: predictions are off by ~{rule.loo_error:.3f} bpb (leave-one-out, on our runs), a difference "
                 f"of two by ~{rule.difference_error:.3f}: shapes closer than that are a toss-up")
    if plan.config.train.optimizer != "adamw":
        # Round 15 (docs/speedrun.md): for the Muon default the rule's figures were 0.15-0.19 bpb
        # too high, and its picks of smaller shapes at 3 minutes (3 x 64, 2 x 64) lost by 0.024-0.027.
        lines.append(f"note: the rule is fitted on AdamW runs and this config trains with {plan.config.train.optimizer}: "
                     "its bpb figures are pessimistic, and a pick away from the config's shape is worth a run "
                     "beside it before you trust it")
    if plan.warmup_capped:
        lines.append(f"train.warmup_steps lowered to {plan.config.train.warmup_steps} (half the planned steps)")
    return "\n".join(lines)


def _why(plan: Plan) -> str:
    pick, configured, rule = plan.pick, plan.configured, plan.rule
    best = min(plan.rows, key=lambda row: row.predicted_bpb)
    if pick is not configured:
        return (f"the lowest predicted val bpb, {pick.predicted_bpb:.3f}, against {configured.predicted_bpb:.3f} "
                f"for the config's {configured.shape}")
    if best is pick:
        return f"the config's own shape, the lowest predicted val bpb ({pick.predicted_bpb:.3f})"
    return (f"the config's own shape ({pick.predicted_bpb:.3f}): the best prediction, {best.shape}'s "
            f"{best.predicted_bpb:.3f}, beats it by less than the error of a difference ({rule.difference_error:.3f})")


def write_plan(plan: Plan, out: Path, force: bool) -> None:
    """The picked config as YAML at ``out``, atomically; an existing file only with ``force``."""
    from lmtrain.fsutil import atomic_write_text

    if out.exists() and not force:
        raise ConfigError(f"{out} exists; use --force to overwrite it")
    header = (f"# lmtrain plan --minutes {plan.minutes:g}: {plan.pick.shape}, predicted val bpb "
              f"{plan.pick.predicted_bpb:.3f} (+-{plan.rule.loo_error:.3f}) on {plan.device}\n")
    atomic_write_text(out, header + plan.config.to_yaml())
