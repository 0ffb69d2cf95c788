"""train.max_minutes: the run decides its step count from the budget, fits its whole schedule
(warmup, stable phase, decay) inside it, keeps the decision on resume, and moves its end earlier
when the machine turns out slower than the probe said."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from lmtrain import budget as budget_mod
from lmtrain.budget import Costs, plan, replan, seconds_for, steps_that_fit
from lmtrain.config import load_config
from lmtrain.errors import ConfigError
from lmtrain.rundir import fork_run
from lmtrain.timing import Measurer
from lmtrain.schedule import Schedule, lr_at
from lmtrain.train import train
from test_train import interrupted_at


def train_config(**changes):
    tc = load_config(None).train
    tc.eval_every, tc.checkpoint_every, tc.warmup_steps = 10, 25, 5
    for key, value in changes.items():
        setattr(tc, key, value)
    return tc


def test_the_decision_is_a_pure_function_of_the_measured_costs():
    tc = train_config()
    costs = Costs(step=0.1, eval=1.0, checkpoint=2.0)
    # 30 steps: evals at 10, 20, 25 (a checkpoint), 30 (the end); checkpoints at 25 and 30.
    assert seconds_for(30, costs, tc) == pytest.approx(30 * 0.1 + 4 * 1.0 + 2 * 2.0)
    assert seconds_for(30, costs, tc, start=20) == pytest.approx(10 * 0.1 + 2 * 1.0 + 2 * 2.0)
    last = steps_that_fit(100.0, costs, tc)
    assert seconds_for(last, costs, tc) <= 100.0 < seconds_for(last + 1, costs, tc)
    assert steps_that_fit(100.0, costs, tc) == last  # the same figures, the same decision
    for schedule in ("cosine", "wsd"):
        tc = train_config(schedule=schedule)
        decided = Schedule.of(tc).with_steps(plan(2.0, costs, tc, step=0, seconds_spent=3.0, probe_seconds=3.0).max_steps)
        assert lr_at(decided.max_steps - 1, decided) == pytest.approx(tc.min_lr)  # the decay is done at the last step
        assert lr_at(tc.warmup_steps, decided) == pytest.approx(tc.lr)
    with pytest.raises(ConfigError, match=r"train.max_minutes 0.01 leaves time for \d+ steps .* too few for a schedule"):
        plan(0.01, costs, train_config(), step=0, seconds_spent=0.0, probe_seconds=0.0)
    # Fewer steps than train.max_steps: the warmup keeps its length (a shorter one measured worse).
    short = plan(0.3, Costs(0.1, 0.1, 0.1), train_config(max_steps=200, warmup_steps=20), 0, 0.0, 0.0)
    assert short.max_steps < 200 and short.warmup_steps == 20
    with pytest.raises(ConfigError, match="too few for a schedule"):  # the budget cannot end the warmup
        plan(0.3, Costs(0.1, 0.1, 0.1), train_config(max_steps=2000, warmup_steps=500), 0, 0.0, 0.0)
    # Slower than planned: the end moves earlier, to what fits. Faster: later, wsd only before its
    # decay (moving a decay begun would raise the rate again), a cosine at any step (the rest of
    # its curve is spread over the steps left: test_a_moved_cosine_goes_on_from_where_it_stood).
    for schedule in ("cosine", "wsd"):
        tc = train_config(max_steps=1000, schedule=schedule)
        budget = plan(3.0, Costs(0.1, 1.0, 2.0), tc, 0, 0.0, 0.0)
        decided = Schedule.of(tc).with_steps(budget.max_steps)
        earlier = replan(budget, Costs(0.2, 1.0, 2.0), tc, decided, step=100, seconds_spent=30.0)
        assert 100 < earlier < budget.max_steps
        assert seconds_for(earlier, Costs(0.2, 1.0, 2.0), tc, start=100) <= 150.0
        later = replan(budget, Costs(0.05, 1.0, 2.0), tc, decided, step=100, seconds_spent=30.0)
        assert later > budget.max_steps and seconds_for(later, Costs(0.05, 1.0, 2.0), tc, start=100) <= 150.0
        late = budget.max_steps - 5  # in wsd's decay the end stays; a cosine's moves
        moved = replan(budget, Costs(0.05, 1.0, 2.0), tc, decided, step=late, seconds_spent=170.0)
        assert (moved is None) if schedule == "wsd" else moved > budget.max_steps


def test_a_moved_cosine_goes_on_from_where_it_stood():
    """A cosine whose end moves after its warmup (the budget keeper, when the pace differs from the
    probe's) keeps the rate it has reached and follows the rest of its curve over the steps left,
    to min_lr at its new last step: no jump up or down, and a resumed run rebuilds it from the
    recorded decision exactly."""
    from lmtrain.budget import Budget

    tc = train_config(max_steps=200, schedule="cosine", warmup_steps=10, lr=1e-3, min_lr=1e-5)
    planned = Schedule.of(tc)
    for step, end in ((5, 300), (60, 400), (60, 120), (199, 250)):
        moved = planned.moved(step, end)
        assert moved.max_steps == end
        assert lr_at(step, moved) == pytest.approx(lr_at(step, planned), rel=1e-12)  # where it stood
        assert lr_at(end - 1, moved) == pytest.approx(tc.min_lr)  # its decay done at the new end
        rates = [lr_at(s, moved) for s in range(max(step, tc.warmup_steps), end)]
        assert all(a >= b for a, b in zip(rates, rates[1:]))  # and falling all the way
    assert planned.moved(5, 300) == planned.with_steps(300)  # in the warmup: nothing to anchor
    twice = planned.moved(60, 400).moved(150, 300)  # moved again: from where the first move had it
    assert lr_at(150, twice) == pytest.approx(lr_at(150, planned.moved(60, 400)), rel=1e-12)
    assert lr_at(299, twice) == pytest.approx(tc.min_lr)
    # The budget records the move; a resumed run lays the schedule out from the record alone.
    budget = Budget(1.0, 200, Costs(0.1, 1.0, 2.0), 0.0, 10)
    followed = budget.move(budget.move(planned, 60, 400), 150, 300)
    saved = json.loads(json.dumps(budget.to_dict()))
    assert saved["max_steps"] == 300 and saved["anchor"][0] == 150
    rebuilt = Budget.from_dict(saved).schedule(Schedule.of(tc))
    assert rebuilt == followed and [lr_at(s, rebuilt) for s in range(150, 300)] == [lr_at(s, followed) for s in range(150, 300)]
    assert Schedule(**rebuilt.to_dict()) == rebuilt  # and the checkpoint's copy of it, too
    for corrupt in ("ab", [1], [0, 0.5], [3, 1.5], [3, float("nan")]):
        with pytest.raises((KeyError, TypeError, ValueError)):
            Budget.from_dict({**saved, "anchor": corrupt})
    # wsd keeps its shape (its decay is a share of the steps): the plain with_steps.
    wsd = Schedule.of(train_config(max_steps=200, schedule="wsd", warmup_steps=10))
    assert wsd.moved(60, 400) == wsd.with_steps(400)



def test_a_decision_made_before_a_steps_evaluation_counts_it():
    """The loop decides after a step and before that step's evaluation and checkpoint: a run on pace
    at step 100 of a 1-minute budget keeps to the time it has (it used to see 3 s more, move its end
    later, and move it back ten steps on)."""
    tc = train_config(max_steps=560, schedule="wsd", warmup_steps=20, eval_every=100, checkpoint_every=100)
    costs = Costs(step=0.4, eval=3.0, checkpoint=0.03)
    assert [budget_mod.owed(s, costs, tc) for s in (0, 99, 100)] == [0.0, 0.0, pytest.approx(3.03)]
    budget = plan(1.0, costs, tc, step=10, seconds_spent=4.0, probe_seconds=0.0, owes=True)
    decided = Schedule.of(tc).with_steps(budget.max_steps)
    on_pace = 4.0 + seconds_for(100, costs, tc, start=10) - budget_mod.owed(100, costs, tc)
    last = replan(budget, costs, tc, decided, step=100, seconds_spent=on_pace)
    rest = seconds_for(last or decided.max_steps, costs, tc, start=100) + budget_mod.owed(100, costs, tc)
    assert rest <= 60.0 - on_pace  # it may take back its unused margin, not time it does not have
    # And the first decision, after step 100's own timed steps, leaves its evaluation room too.
    tc = train_config(max_steps=560, eval_every=10, checkpoint_every=10)
    late = plan(1.0, costs, tc, step=10, seconds_spent=4.0, probe_seconds=0.0, owes=True)
    early = plan(1.0, costs, tc, step=10, seconds_spent=4.0, probe_seconds=0.0)
    assert seconds_for(late.max_steps, costs, tc, start=10) + 3.03 <= budget_mod.MARGIN * 56.0 and late.max_steps < early.max_steps


def test_the_end_gets_a_last_chance_to_move_later_before_the_decay():
    """The end can move later only until the decay begins, so the pace is checked at the step
    before it too, and there any step more is taken (round 17: a run whose machine sped up found its
    decay begun at the next check and ended 4 s inside a 1-minute budget)."""
    from lmtrain.budget import last_chance, replan_due

    tc = train_config(max_steps=150, schedule="wsd", warmup_steps=20, eval_every=100, checkpoint_every=100)
    schedule = Schedule.of(tc)
    assert last_chance(schedule) == 119  # decay over the last 30 steps: 120-149
    assert [s for s in range(100, 131) if replan_due(schedule, s)] == [100, 110, 119, 120, 130]
    assert last_chance(Schedule.of(train_config(schedule="cosine", warmup_steps=20))) is None  # any step
    assert last_chance(Schedule.of(train_config(schedule="constant"))) is None
    costs = Costs(step=0.4, eval=3.0, checkpoint=0.03)
    budget = plan(1.0, costs, tc, step=10, seconds_spent=4.0, probe_seconds=0.0, owes=True)
    schedule = schedule.with_steps(budget.max_steps)
    at = last_chance(schedule)
    # Time for two steps more (under REPLAN_OVER's 2%): only the last chance takes them.
    spent = 60.0 - (seconds_for(schedule.max_steps + 2, costs, tc, start=at) + 0.2) / budget_mod.MARGIN
    moved = replan(budget, costs, tc, schedule, step=at, seconds_spent=spent)
    assert moved == schedule.max_steps + 2 and seconds_for(moved, costs, tc, start=at) <= 60.0 - spent
    assert replan(budget, costs, tc, schedule, step=at - 1, seconds_spent=spent - costs.step) is None


def test_the_pace_is_the_later_half_of_the_steps():
    """A machine that speeds up (or slows down) midway: the pace the budget plans the rest with is
    the recent one, not a mean that still carries the first half."""
    from lmtrain.budget import RunClock

    pace, planned = RunClock(), Costs(step=0.5, eval=2.0, checkpoint=0.1)
    pace.start, clock = 0.0, 0.0
    seen = []
    for steps in range(10, 101, 10):
        clock += 10 * (0.4 if steps <= 50 else 0.3)
        seen.append(pace.costs(steps, clock, planned).step)
    assert seen[0] == pytest.approx(0.4) and seen[-1] == pytest.approx(0.3)  # steps 50-100
    assert pace.costs(100, clock, planned).eval == 2.0  # no evaluation timed yet: the planned one
    with pace.timing("eval"):
        pass
    assert pace.costs(100, clock, planned).eval < 0.1


def no_replanning(monkeypatch):
    """The run keeps its decision: the loop never checks its pace."""
    monkeypatch.setattr(budget_mod, "replan_due", lambda schedule, step: False)


def no_hard_stop(monkeypatch):
    """The clock is no judge on a loaded machine: the run never stops at train.max_minutes."""
    monkeypatch.setattr(budget_mod.BudgetKeeper, "out_of_time", lambda self, seconds: False)


def fixed_probe(monkeypatch, costs, seconds=1.0):
    calls = []

    def probe(measurer, batches, schedule, step, budget_seconds):
        calls.append(step)
        return costs, seconds

    monkeypatch.setattr(Measurer, "probe", probe)
    return calls


@pytest.mark.slow
def test_a_budgeted_run_ends_its_decay_in_time_and_resumes_exactly(tiny_run, tmp_path, monkeypatch):
    config, run_dir = tiny_run
    # The decision, not the clock, is under test: no re-planning and no hard stop (the suite's
    # machine is loaded, and these tiny steps do not take the 0.2 s the probe claims anyway).
    no_replanning(monkeypatch)
    no_hard_stop(monkeypatch)
    calls = fixed_probe(monkeypatch, Costs(step=0.2, eval=0.5, checkpoint=0.5))
    sets = ["train.max_minutes=0.2", "train.max_steps=1000", "train.schedule=cosine", "train.eval_every=5",
            "train.checkpoint_every=10"]
    cfg = load_config(config, sets)
    interrupted_at(7, cfg, monkeypatch)
    fixed_probe(monkeypatch, Costs(step=0.2, eval=0.5, checkpoint=0.5))
    resumed = train(load_config(config, sets))
    state = json.loads((resumed.checkpoint / "state.json").read_text())
    # 12 s less the 1 s probe, MARGIN (97%) of it, in 0.2 s steps, evals and checkpoints. (The tiny
    # steps run far faster than 0.2 s: re-planning is off here, and under test below.)
    expected = steps_that_fit(budget_mod.MARGIN * 11.0, Costs(0.2, 0.5, 0.5), cfg.train)
    assert state["budget"]["max_steps"] == resumed.step == expected and calls == [0]
    assert resumed.budget["costs"] == {"step": 0.2, "eval": 0.5, "checkpoint": 0.5}
    assert [h["lr"] for h in resumed.history if "lr" in h][-1] == pytest.approx(cfg.train.min_lr)
    log_text = (run_dir / "train.log").read_text()
    assert f"schedule ends at step {expected} instead of train.max_steps 1000" in log_text
    assert "budget 0.2 min:" in log_text

    # Uninterrupted, with the same decision: the same weights, bit for bit.
    straight = tmp_path / "straight"
    fork_run(run_dir, straight)
    fixed_probe(monkeypatch, Costs(step=0.2, eval=0.5, checkpoint=0.5))
    other = train(load_config(config, sets + [f"run.dir={straight}"]))
    ours, theirs = load_file(str(resumed.checkpoint / "model.safetensors")), load_file(str(other.checkpoint / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_a_cosine_moved_later_after_its_warmup_resumes_exactly(tiny_run, tmp_path, monkeypatch):
    """The probe said 0.2 s a step; at step 20 the pace leaves time for 20 steps more. The cosine,
    well past its warmup, goes on from its rate there to min_lr at the new end, and a run stopped
    after the move and resumed follows the same moved schedule: the same weights as a run that
    went straight through, bit for bit."""
    config, run_dir = tiny_run
    no_hard_stop(monkeypatch)

    def faster_at_step_20(budget, pace, tc, schedule, step, seconds_spent):
        return schedule.max_steps + 20 if step == 20 else None

    monkeypatch.setattr(budget_mod, "replan", faster_at_step_20)
    sets = ["train.max_minutes=0.2", "train.max_steps=1000", "train.schedule=cosine", "train.warmup_steps=2",
            "train.eval_every=5", "train.checkpoint_every=10", "train.log_every=1"]
    fixed_probe(monkeypatch, Costs(step=0.2, eval=0.5, checkpoint=0.5))
    interrupted_at(27, load_config(config, sets), monkeypatch)
    resumed = train(load_config(config, sets))
    planned = steps_that_fit(budget_mod.MARGIN * 11.0, Costs(0.2, 0.5, 0.5), load_config(config, sets).train)
    assert resumed.step == resumed.budget["max_steps"] == planned + 20 and resumed.budget["anchor"][0] == 20
    assert "the run now ends at step" in (run_dir / "train.log").read_text()

    straight = tmp_path / "straight"
    fork_run(run_dir, straight)
    fixed_probe(monkeypatch, Costs(step=0.2, eval=0.5, checkpoint=0.5))
    other = train(load_config(config, sets + [f"run.dir={straight}"]))
    assert other.step == resumed.step and other.budget["anchor"] == resumed.budget["anchor"]
    rates = {h["step"]: h["lr"] for h in other.history if "lr" in h}
    tc = load_config(config, sets).train
    before = Schedule.of(tc).with_steps(planned)
    assert rates[21] == pytest.approx(lr_at(20, before), rel=1e-9)  # the 21st step: the rate where it stood
    assert rates[20] >= rates[21] >= rates[22] and rates[other.step] == pytest.approx(tc.min_lr)
    ours, theirs = load_file(str(resumed.checkpoint / "model.safetensors")), load_file(str(other.checkpoint / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_the_real_probe_changes_nothing_but_the_step_count(tiny_run, tmp_path, monkeypatch):
    config, run_dir = tiny_run
    # The run must keep the probe's decision for a plain run to repeat: no re-planning, and, since
    # on a loaded machine (the suite runs on two workers) the clock is no judge, no hard stop.
    no_replanning(monkeypatch)
    real_plan = budget_mod.plan

    def plan_30(minutes, costs, tc, step, spent, probe_seconds, owes=False):  # the real probe's figures, 30 steps
        tc = dataclasses.replace(tc, max_steps=30)
        budget = real_plan(1000.0, costs, tc, step, spent, probe_seconds, owes=owes)
        budget.minutes, budget.max_steps = minutes, 30
        return budget

    monkeypatch.setattr(budget_mod, "plan", plan_30)
    no_hard_stop(monkeypatch)
    sets = ["train.eval_every=20", "train.checkpoint_every=1000", "train.log_every=1000"]
    budgeted = train(load_config(config, ["train.max_minutes=0.1"] + sets))
    steps = budgeted.budget["max_steps"]
    assert budgeted.step == steps == 30 and budgeted.stopped_by == "max_steps"
    assert budgeted.budget["probe_seconds"] > 0 and budgeted.budget["costs"]["step"] > 0
    straight = tmp_path / "straight"
    straight.mkdir()

    fork_run(run_dir, straight)
    plain = train(load_config(config, [f"run.dir={straight}", f"train.max_steps={steps}"] + sets))
    ours = load_file(str(budgeted.checkpoint / "model.safetensors"))
    theirs = load_file(str(plain.checkpoint / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_a_slower_machine_moves_the_decay_earlier(tiny_run, monkeypatch):
    config, run_dir = tiny_run
    # The probe claims 1 ms a step: the plan is thousands of steps, far more than 6 s allow. (The
    # eval and checkpoint figures are generous: a loaded machine's final ones must fit too.)
    fixed_probe(monkeypatch, Costs(step=0.001, eval=0.1, checkpoint=0.3), seconds=0.0)
    monkeypatch.setattr(budget_mod, "REPLAN_EVERY", 3)  # keep up with a loaded machine's pace
    result = train(load_config(config, ["train.max_minutes=0.1", "train.schedule=wsd", "train.eval_every=50",
                                        "train.checkpoint_every=100000"]))
    assert result.stopped_by == "max_steps" and result.train_seconds <= 6.0
    assert result.budget["replans"] and result.step < result.budget["replans"][0]["at"] + 10_000
    assert [h["lr"] for h in result.history if "lr" in h][-1] == pytest.approx(3e-4)  # min_lr: decayed
    assert "training runs slower than the probe measured" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_budget_too_small_for_the_warmup_is_one_line(tiny_run):
    config, run_dir = tiny_run
    result = run_cli("train", "--config", str(config), "--set", "train.max_minutes=0.001",
                     "--set", "train.warmup_steps=500")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "train.max_minutes 0.001 leaves time for" in result.stderr and "too few for a schedule" in result.stderr


@pytest.mark.slow
def test_a_run_with_a_warmup_decides_from_its_own_steps_and_keeps_them(tiny_run, tmp_path, monkeypatch):
    """The warmup's learning rate does not depend on the step count, so its first steps are timed for
    the decision and are training: nothing is undone. The decision comes after them, resumes keep
    it, and the run is the plain run of the decided length, bit for bit."""

    config, run_dir = tiny_run
    no_replanning(monkeypatch)
    no_hard_stop(monkeypatch)
    decided_at = []
    measured = []
    real_measure = Measurer.measure

    def measure(measurer, step_seconds):
        measured.append(len(step_seconds))
        return real_measure(measurer, step_seconds)

    def fixed(minutes, costs, tc, step, spent, probe_seconds, owes=False):
        decided_at.append(step)
        return budget_mod.Budget(minutes, 30, costs, probe_seconds, tc.warmup_steps)

    monkeypatch.setattr(Measurer, "measure", measure)
    monkeypatch.setattr(budget_mod, "plan", fixed)
    sets = ["train.max_minutes=5", "train.warmup_steps=20", "train.eval_every=20", "train.checkpoint_every=15",
            "train.log_every=1000"]
    interrupted_at(18, load_config(config, sets), monkeypatch)
    resumed = train(load_config(config, sets))
    assert decided_at == [10] and measured == [10]  # once, after ten steps of its own; resume kept it
    assert resumed.step == 30 and resumed.budget["max_steps"] == 30 and resumed.budget["costs"]["step"] > 0
    assert "timed over steps 2-10 of this run" in (run_dir / "train.log").read_text()
    plain_dir = tmp_path / "plain"
    fork_run(run_dir, plain_dir)
    plain = train(load_config(config, sets[1:] + ["train.max_steps=30", f"run.dir={plain_dir}"]))
    ours = load_file(str(resumed.checkpoint / "model.safetensors"))
    theirs = load_file(str(plain.checkpoint / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_max_epochs_ends_the_schedule_where_the_data_has_been_seen_that_often_and_resumes_exactly(
        tiny_run, tmp_path, monkeypatch):
    from lmtrain.budget import epoch_steps
    from lmtrain.data import RunData

    config, run_dir = tiny_run
    no_replanning(monkeypatch)
    no_hard_stop(monkeypatch)
    # A budget that pays for hundreds of steps; the epochs end it far sooner, with the decay done there.
    sets = ["train.max_minutes=1", "train.max_steps=1000", "train.schedule=cosine", "train.eval_every=5",
            "train.checkpoint_every=10", "train.max_epochs=0.2", "train.early_stop=0"]
    cfg = load_config(config, sets)
    per_step = cfg.train.batch_size * cfg.model.block_size
    cap = epoch_steps(0.2, RunData.open(cfg).epoch_tokens, per_step)
    assert 12 < cap < 60
    fixed_probe(monkeypatch, Costs(step=0.05, eval=0.1, checkpoint=0.1))
    interrupted_at(7, cfg, monkeypatch)
    fixed_probe(monkeypatch, Costs(step=0.05, eval=0.1, checkpoint=0.1))
    resumed = train(load_config(config, sets))
    assert resumed.step == cap and resumed.resumed_from is not None
    assert [h["lr"] for h in resumed.history if "lr" in h][-1] == pytest.approx(cfg.train.min_lr)
    log_text = (run_dir / "train.log").read_text()
    assert f"train.max_epochs 0.2: the run ends at step {cap}" in log_text
    assert f"; {cap} steps of" in log_text  # the epochs are announced once the budget has decided the steps
    straight = tmp_path / "straight"
    fork_run(run_dir, straight)
    fixed_probe(monkeypatch, Costs(step=0.05, eval=0.1, checkpoint=0.1))
    other = train(load_config(config, sets + [f"run.dir={straight}"]))
    ours, theirs = load_file(str(resumed.checkpoint / "model.safetensors")), load_file(str(other.checkpoint / "model.safetensors"))
    assert other.step == cap and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # Without a budget, the earlier of train.max_steps and train.max_epochs ends the run.
    fork_run(run_dir, tmp_path / "steps")
    unbudgeted = train(load_config(config, ["train.max_steps=1000", "train.max_epochs=0.2", "train.early_stop=0",
                                            f"run.dir={tmp_path / 'steps'}"]))
    assert unbudgeted.step == cap
