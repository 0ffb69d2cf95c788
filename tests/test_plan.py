"""`lmtrain plan`: the scaling rule, the choice among measured shapes, and the config it writes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from conftest import run_cli
from lmtrain.config import load_config
from lmtrain.errors import ConfigError
from lmtrain import plan as plan_module
from lmtrain.plan import ALPHA, BETA, Candidate, Plan, ScalingRule, candidates, choose, format_plan, measure


def test_the_rule_recovers_a_law_it_was_fitted_on_and_says_how_wrong_it_is():
    law = lambda n, d: 0.8 + 0.3 * (n / 1e6) ** -ALPHA + 0.9 * (d / 1e6) ** -BETA  # noqa: E731
    points = [{"params": n, "tokens": d, "val_bpb": law(n, d)}
              for n in (1e5, 6e5, 3e6) for d in (2e5, 1e6, 5e6)]
    rule = ScalingRule.fit(points)
    assert rule.predict(1e6, 2e6) == pytest.approx(law(1e6, 2e6), abs=0.02)
    assert rule.loo_error < 0.02 and rule.runs == 9
    noisy = [dict(p, val_bpb=p["val_bpb"] + (0.05 if i % 2 else -0.05)) for i, p in enumerate(points)]
    assert ScalingRule.fit(noisy).loo_error > 0.04  # noise shows up in the error it reports
    for optimizer in ("adamw", "muon"):  # the shipped measurements fit, each optimizer its own runs
        ours = ScalingRule.ours(optimizer)
        assert ours.optimizer == optimizer and ours.runs >= 10 and ours.loo_error < 0.03
        assert 0 < ours.predict(6e5, 1.2e6) < 4
    # N counts the embedding table, at the measured runs' vocabulary whatever the config's.
    assert plan_module.rule_params(200_000, 96) == 200_000 + 4096 * 96


def test_the_pick_trades_model_size_against_the_tokens_the_budget_buys():
    config = load_config(None, ["train.warmup_steps=10", "train.eval_every=1000", "train.checkpoint_every=1000"])
    shapes = candidates(config)
    L, C = config.model.n_layer, config.model.n_embd
    widths = {c.n_embd for c in shapes}  # whole heads: half of 96 at head size 32 rounds to 64
    assert {c.n_layer for c in shapes} == {max(2, L - 1), L, L + 1} and {C, 2 * C} <= widths and min(widths) < C
    # Depth L-1..L+1, but no single block unless the config is one.
    assert {c.n_layer for c in candidates(load_config(None, ["model.n_layer=4"]))} == {3, 4, 5}
    assert {c.n_layer for c in candidates(load_config(None, ["model.n_layer=2"]))} == {2, 3}
    assert {c.n_layer for c in candidates(load_config(None, ["model.n_layer=1"]))} == {1, 2}
    assert all(c.n_embd // c.n_head == config.model.n_embd // config.model.n_head for c in shapes)
    rule = ScalingRule(e=0.5, a=0.3, b=0.9, loo_error=0.01, runs=9)

    def measured():  # step time proportional to parameters: the bigger, the fewer tokens
        rows = [Candidate(1, 64, 1), Candidate(2, 128, 2), Candidate(4, 256, 4)]
        for row, params in zip(rows, (5e4, 4e5, 3.2e6)):
            row.params = row.total_params = int(params)
            row.step_seconds = params / 2e6
        return rows

    short, _ = choose(config, measured(), rule, minutes=0.5)
    long, rows = choose(config, measured(), rule, minutes=600)
    assert short.params < long.params  # more time buys a bigger model
    assert long.predicted_bpb == min(r.predicted_bpb for r in rows) and long.tokens == long.steps * 4096
    assert choose(config, measured(), rule, minutes=600)[0].n_layer == long.n_layer  # deterministic
    with pytest.raises(ConfigError, match="no candidate gets past train.warmup_steps"):
        choose(config, measured(), rule, minutes=0.001)


def test_a_toss_up_keeps_the_configs_own_shape():
    config = load_config(None, ["train.warmup_steps=10", "train.eval_every=1000", "train.checkpoint_every=1000"])
    L, C, H = config.model.n_layer, config.model.n_embd, config.model.n_head

    def measured():  # the deeper shape: 1.5x the parameters (with the embedding table) for 1.2x the step
        rows = [Candidate(L, C, H), Candidate(L + 1, C, H)]
        for row, params, seconds in zip(rows, (2e5, 5e5), (0.3, 0.36)):
            row.params, row.total_params, row.step_seconds = int(params), int(params) + 400_000, seconds
        return rows

    sure = ScalingRule(e=0.5, a=0.3, b=0.9, loo_error=0.001, runs=9, optimizer="muon")
    pick, rows = choose(config, measured(), sure, minutes=10)
    gain = rows[0].predicted_bpb - rows[1].predicted_bpb
    assert pick.n_layer == L + 1 and 0.001 < gain < 0.05  # a sure rule follows its prediction
    unsure = replace(sure, loo_error=0.05)
    pick, rows = choose(config, measured(), unsure, minutes=10)
    assert pick.n_layer == L and pick.predicted_bpb > min(r.predicted_bpb for r in rows)  # within its error
    # A gain above the rule's error but below that of a difference of two predictions (sqrt 2 x):
    # still a toss-up (round 15's 3-minute pick, predicted 0.027 better at an error of 0.021, lost).
    between = replace(sure, loo_error=gain / 1.2)
    assert between.loo_error < gain < between.difference_error
    assert choose(config, measured(), between, minutes=10)[0].n_layer == L
    pick, rows = choose(config, measured(), between, minutes=10)
    text = format_plan(Plan(10, "cpu (fp32)", rows, pick, rows[0], between, config, False))
    assert "a difference of two by" in text and "the config's own shape" in text
    assert "fitted on 9 measured muon runs" in text and "note:" not in text
    # A rule fitted on another optimizer's runs says so.
    adamw = replace(between, optimizer="adamw")
    text = format_plan(Plan(10, "cpu (fp32)", rows, pick, rows[0], adamw, config, False))
    assert config.train.optimizer == "muon" and "fitted on adamw runs and this config trains with muon" in text


def test_measuring_ranks_shapes_by_their_cost_while_the_machine_speed_drifts(monkeypatch):
    config = load_config(None)
    clock = {"steps": 0}

    class DriftingStepper:  # a step costs n_layer * n_embd units; the machine slows 3x midway
        def __init__(self, config, vocab_size, device, precision):
            self.cost = config.model.n_layer * config.model.n_embd * 1e-4
            self.params, self.total_params = self.cost, self.cost + 1

        def step(self):
            clock["steps"] += 1
            return self.cost * (3.0 if 40 <= clock["steps"] < 80 else 1.0)

        def eval_micro_batch(self):  # half a step, as on a CPU
            return 0.5 * self.cost * (3.0 if 40 <= clock["steps"] < 80 else 1.0)

        def close(self):
            pass

    monkeypatch.setattr(plan_module, "_Stepper", DriftingStepper)
    rows = candidates(config)
    own = measure(config, rows, 4096, device=None, precision="fp32", min_seconds=0, progress=False)
    reference = config.model.n_layer * config.model.n_embd * 1e-4
    assert own == pytest.approx(reference)  # the config's median step: the slow phase is a minority
    for row in rows:  # each shape's time relative to the config's, untouched by when it was timed
        assert row.step_seconds == pytest.approx(row.n_layer * row.n_embd * 1e-4 * own / reference)
        assert row.eval_seconds == pytest.approx(0.5 * row.step_seconds * config.train.eval_batches)


@pytest.mark.slow
def test_plan_writes_a_config_that_trains(tiny_run, tmp_path):
    config, run_dir = tiny_run
    out = tmp_path / "plan.yaml"
    result = run_cli("plan", "--minutes", "0.5", "--config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "<- pick" in result.stdout and "error: predictions are off by" in result.stdout
    assert f"wrote {out}: lmtrain run --config {out}" in result.stdout
    planned = load_config(out)  # validates
    assert planned.train.max_minutes == 0.5 and planned.train.fit_to_budget
    assert planned.run_dir != run_dir and str(planned.run_dir).startswith(str(run_dir))
    again = run_cli("plan", "--minutes", "0.5", "--config", str(config), "--out", str(out))
    assert again.returncode == 2 and "exists; use --force" in again.stderr
    # The pick (another shape, or the config's own: which depends on this machine's timings) and
    # its prediction, in the plan's header.
    header = out.read_text().splitlines()[0]
    assert header.startswith("# lmtrain plan --minutes 0.5: ") and "predicted val bpb " in header
    assert math.isfinite(float(header.split("predicted val bpb ")[1].split()[0]))
    assert "pick: " in result.stdout and ("the lowest predicted val bpb" in result.stdout
                                          or "the config's own shape" in result.stdout)


def test_repeated_tokens_are_worth_less_and_the_plan_shows_the_epochs():
    import math

    from lmtrain.plan import Repetition

    paper = Repetition()
    REPEAT_DECAY, effective_tokens = paper.tokens_decay, paper.tokens  # the paper's R_D* = 15.4
    unique = 1e6
    assert effective_tokens(5e5, unique) == 5e5 and effective_tokens(1e6, unique) == 1e6
    assert effective_tokens(2e6, unique) == pytest.approx(1e6 + 1e6 * REPEAT_DECAY * (1 - math.exp(-1 / REPEAT_DECAY)))
    worth = [effective_tokens(e * unique, unique) for e in (1, 2, 4, 16, 64, 1000)]
    assert worth == sorted(worth) and worth[-1] <= unique * (1 + REPEAT_DECAY) * (1 + 1e-12)  # more helps, ever less
    assert worth[1] > 1.9e6 and worth[4] < 20e6  # two epochs are nearly fresh data, sixty-four are worth 16
    config = load_config(None, ["model.n_layer=2", "model.n_embd=128", "model.n_head=2", "train.batch_size=8",
                                "model.block_size=512", "train.warmup_steps=1", "train.eval_every=1000000"])
    rule = ScalingRule(e=0.5, a=0.3, b=0.9, loo_error=0.01, runs=9)

    def rows():
        row = Candidate(2, 128, 2)
        row.params = row.total_params = 400_000
        row.step_seconds = 0.1
        return [row]

    fresh = choose(config, rows(), rule, minutes=10)[0]
    repeated = choose(config, rows(), rule, minutes=10, unique_tokens=fresh.tokens // 20)[0]
    assert repeated.epochs == pytest.approx(20, rel=0.01) and fresh.epochs is None
    assert repeated.predicted_bpb > fresh.predicted_bpb
    plan = Plan(10, "cpu", [repeated], repeated, repeated, rule, config, False)
    table = format_plan(plan)
    assert "epochs" in table.splitlines()[0] and "seen 20.0 times" in table and "more data does more" in table


def test_the_repetition_constants_are_recovered_from_runs_made_with_them():
    from lmtrain.plan import PARAMS_DECAYS, TOKENS_DECAYS, TOKENS_PER_PARAMS, Repetition, fit_repetition

    rule = ScalingRule(e=0.5, a=0.3, b=0.9, loo_error=0.01, runs=9)
    truth = Repetition(float(TOKENS_DECAYS[8]), float(PARAMS_DECAYS[12]), float(TOKENS_PER_PARAMS[20]))
    entropy = {"prose": 0.7, "code": 1.1}  # corpora differ in how predictable they are: each its own E
    points = []
    for corpus, unique in (("prose", 1e5), ("code", 3e5)):
        for params, n_embd in ((1e5, 64), (2.2e5, 96), (6e5, 128), (1.3e6, 192)):
            for epochs in (2, 8, 32):
                worth_n = truth.params(plan_module.rule_params(params, n_embd), unique)
                worth_d = truth.tokens(epochs * unique, unique)
                points.append({"corpus": corpus, "params": params, "n_embd": n_embd, "tokens": epochs * unique,
                               "unique_tokens": unique, "val_bpb": entropy[corpus] + rule.predict(worth_n, worth_d) - rule.e})
    fitted = fit_repetition(points, rule)
    assert (fitted.tokens_decay, fitted.params_decay, fitted.tokens_per_param) == pytest.approx(
        (truth.tokens_decay, truth.params_decay, truth.tokens_per_param))
    assert fitted.loo_error < 1e-6 and fitted.runs == len(points)
    # The shipped fit: our small-corpus runs, with the error it reports.
    ours = Repetition.ours()
    assert ours.runs >= 12 and 0 < ours.loo_error < 0.15
    # Worth less, never worth more: repeats and excess parameters add ever less, and are capped.
    params = [ours.params(n, 1e5) for n in (1e3, 1e4, 1e5, 1e6, 1e7, 1e9)]
    assert params == sorted(params) and params[-1] <= 1e5 / ours.tokens_per_param * (1 + ours.params_decay) * 1.000001
    assert ours.params(5e5, None) == 5e5 and ours.tokens(5e6, None) == 5e6  # no shards: nothing is known to repeat


def test_on_a_tiny_corpus_a_bigger_model_is_not_predicted_better_for_its_size_alone():
    from lmtrain.plan import Repetition

    config = load_config(None, ["train.warmup_steps=1", "train.eval_every=1000000", "train.max_epochs=16"])
    rule = ScalingRule.ours("adamw")

    def rows():
        small, big = Candidate(2, 96, 3), Candidate(3, 192, 6)
        small.params, small.total_params, small.step_seconds = 221_184, 614_400, 0.01
        big.params, big.total_params, big.step_seconds = 1_327_104, 2_113_536, 0.03
        return [small, big]

    # 100K training tokens and a budget in which both shapes reach the 16 epochs the run ends at.
    fresh = {row.shape: row.predicted_bpb for row in choose(config, rows(), rule, 30)[1]}
    tiny = Repetition(tokens_decay=15.4, params_decay=1.0, tokens_per_param=20.0)
    pick, repeated = choose(config, rows(), rule, 30, unique_tokens=100_000, repetition=tiny)
    assert all(row.epochs == pytest.approx(16, rel=0.01) for row in repeated)
    assert fresh["3 x 192"] < fresh["2 x 96"] - 0.05  # on fresh data size pays
    gap = abs(repeated[1].predicted_bpb - repeated[0].predicted_bpb)
    assert gap < rule.difference_error and pick is repeated[0]  # on 100K tokens it is a toss-up: the config's shape
    # On repeated data the repetition fit's own error widens the toss-up; on fresh data it does not count.
    shaky = Repetition(15.4, 5.3, 20.0, loo_error=0.08, runs=18)
    assert plan_module.toss_up(rule, shaky, repeated) == pytest.approx(math.sqrt(2) * math.hypot(rule.loo_error, 0.08))
    assert plan_module.toss_up(rule, shaky, choose(config, rows(), rule, 30)[1]) == pytest.approx(rule.difference_error)


def test_a_plan_for_a_small_corpus_is_measured_and_written_with_the_small_corpus_settings(monkeypatch):
    from lmtrain.small_data import DROPOUT, RECIPE, SMALL_BATCH

    # 1,800 steps of 32 x 128 in 1.5 minutes (and twice as many of 16)
    monkeypatch.setattr(plan_module, "pace", lambda config, *a, **k: 0.05 * config.train.batch_size / 32)
    config = load_config(None, [])
    same, note = plan_module._small_corpus(config, 1.5, 100_000_000, 4096, "cpu", "fp32")
    assert same is config and note is None  # 0.07 epochs: the plan keeps the config's optimiser
    small, note = plan_module._small_corpus(config, 1.5, 100_000, 4096, "cpu", "fp32")
    assert {k: getattr(small.train, k) for k in RECIPE} == RECIPE and small.train.batch_size == SMALL_BATCH
    assert small.train.max_minutes is None and "about 73.7 times" in note  # the budget is set on the pick later
    assert small.model.dropout == DROPOUT and "dropout" in note  # time for many passes: measured as it will train
    assert plan_module._small_corpus(config, 1.5, None, 4096, "cpu", "fp32") == (config, None)  # no shards yet
    rule = ScalingRule(e=0.5, a=0.3, b=0.9, loo_error=0.01, runs=9)
    row = Candidate(2, 96, 3)
    row.params = row.total_params = 400_000
    row.step_seconds, row.steps, row.tokens, row.predicted_bpb, row.epochs = 0.05, 100, 204_800, 2.0, 2.0
    assert note in format_plan(Plan(1.5, "cpu", [row], row, row, rule, small, False, note))
