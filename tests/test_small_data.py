"""Small corpora: the run knows how often it repeats its data, keeps its best evaluation as a
checkpoint whatever train.checkpoint_every says, and what a user reads afterwards is that one."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import run_cli
from lmtrain.config import load_config
from lmtrain.train import train


def scripted_val(monkeypatch, losses):
    """The validator reports these val losses, one per evaluation (the model's own do not matter)."""
    from lmtrain.evaluate import Validator, val_metrics

    feed = iter(losses)

    def run(self):
        return val_metrics(next(feed), self.tokens, self.utf8_bytes), []

    monkeypatch.setattr(Validator, "run", run)


@pytest.mark.slow
def test_the_best_evaluation_is_checkpointed_and_is_what_sample_eval_and_export_read(tiny_run, monkeypatch, tmp_path):
    config, run_dir = tiny_run
    scripted_val(monkeypatch, [3.0, 2.0, 2.5, 2.8])
    result = train(load_config(config, ["train.max_steps=20", "train.eval_every=5", "train.checkpoint_every=100",
                                        "train.checkpoint_best=true"]))
    assert (result.best_step, result.step) == (10, 20)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "best").read_text().strip() == "step-00000010"
    # written at the improving evaluations (5, 10) and the end; train.keep_checkpoints 2 keeps 10 and 20
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step-00000010", "step-00000020"]
    monkeypatch.undo()
    from lmtrain.evaluate import evaluate

    assert evaluate(run_dir).step == 10 and evaluate(run_dir, "latest").step == 20
    sampled = run_cli("sample", "--run", str(run_dir), "-n", "4")
    assert "step-00000010" in sampled.stderr
    done = run_cli("export", "--run", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert done.returncode == 0 and "step 10" in (tmp_path / "hf" / "README.md").read_text() + done.stdout


@pytest.mark.slow
def test_without_checkpoint_best_only_the_cadence_writes(tiny_run, monkeypatch):
    config, run_dir = tiny_run
    scripted_val(monkeypatch, [3.0, 2.0, 2.5, 2.8])
    train(load_config(config, ["train.max_steps=20", "train.eval_every=5", "train.checkpoint_every=100",
                               "train.checkpoint_best=false"]))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["step-00000020"]


@pytest.mark.slow
def test_the_run_says_how_many_epochs_it_sees_and_warns_past_a_few(tiny_run, caplog):
    config, run_dir = tiny_run
    result = train(load_config(config, ["train.max_steps=20"]))
    text = (run_dir / "train.log").read_text()
    tokens = re.search(r"data: ([\d.,K]+) training tokens; 20 steps of 128 tokens see them ([\d.]+) times", text)
    assert tokens, text[:2000]
    lines = [line for line in text.splitlines() if ": loss " in line]
    assert lines[-1].rstrip().endswith(f"epoch {float(tokens.group(2)):.2f}")
    assert "repeats its training data" not in text
    train(load_config(config, ["train.max_steps=800", "train.eval_every=800", "train.checkpoint_every=800"]))
    assert "repeats its training data" in (run_dir / "train.log").read_text()
    assert result.step == 20


@pytest.mark.slow
def test_early_stop_decays_the_rate_and_ends_when_val_stops_improving(tiny_run, monkeypatch):
    config, run_dir = tiny_run
    scripted_val(monkeypatch, [3.0, 2.0, 2.1, 2.2] + [9.0] * 10)
    result = train(load_config(config, ["train.max_steps=100", "train.eval_every=5", "train.early_stop=2",
                                        "train.decay_fraction=0.5", "train.checkpoint_every=100"]))
    # evaluations at 5, 10 (best), 15, 20: two without a new best -> decay over 0.5 x 20 steps
    assert result.step == 30 and result.max_steps == 30 and result.best_step == 10
    lrs = {h["step"]: h["lr"] for h in result.history if "lr" in h}
    assert lrs[21] < lrs[20] and lrs[30] == pytest.approx(load_config(config).train.min_lr)
    assert all(lrs[s + 1] < lrs[s] for s in range(20, 30))
    assert "the run ends at step 30 (train.early_stop 2)" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_run_stopping_early_resumes_bit_exactly(tiny_run, tmp_path, monkeypatch):
    from test_train import interrupted_at, losses, weights

    from lmtrain.rundir import fork_run

    config, run_dir = tiny_run
    sets = ["train.max_steps=100", "train.eval_every=5", "train.early_stop=2", "train.decay_fraction=0.5",
            "train.checkpoint_every=5", "model.dropout=0.1"]
    vals = [3.0, 2.0, 2.1, 2.2] + [9.0] * 10
    fork_run(run_dir, tmp_path / "other")
    scripted_val(monkeypatch, vals)
    straight = train(load_config(config, sets))
    scripted_val(monkeypatch, vals)
    first = interrupted_at(25, load_config(config, sets + [f"run.dir={tmp_path / 'other'}"]), monkeypatch)
    scripted_val(monkeypatch, vals[5:])  # the evaluations after step 25
    second = train(load_config(config, sets + [f"run.dir={tmp_path / 'other'}"]))
    assert second.resumed_from == "step-00000025" and second.step == straight.step == 30
    a, b = weights(run_dir), weights(tmp_path / "other")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {**losses(first), **losses(second)} == losses(straight)


def test_a_run_that_repeats_its_data_trains_with_the_small_corpus_recipe_unless_told_otherwise():
    from lmtrain.small_data import LOWEST_LR, RECIPE, SMALL_BATCH, WEIGHT_DECAY, recipe_lr, small_corpus_defaults

    config = load_config(None, ["train.max_steps=100"])  # 100 x 32 x 128 = 409,600 tokens
    tokens_per_step = 32 * 128
    same, note = small_corpus_defaults(config, 1_000_000, tokens_per_step, None, None)
    assert same is config and note is None  # 0.4 epochs: the default stays
    small, note = small_corpus_defaults(config, 100_000, tokens_per_step, None, None)
    assert {k: getattr(small.train, k) for k in RECIPE} == RECIPE and "about 4.1 times" in note
    assert small.train.weight_decay == WEIGHT_DECAY > config.train.weight_decay and "train.weight_decay" in note
    # a weight decay the user set is theirs; the rest of the recipe still applies
    decayed = load_config(None, ["train.max_steps=100", "train.weight_decay=0.3"])
    mine, note = small_corpus_defaults(decayed, 100_000, tokens_per_step, None, None)
    assert mine.train.weight_decay == 0.3 and mine.train.optimizer == "adamw" and "weight decay" not in note
    told = load_config(None, ["train.max_steps=100", "train.optimizer=muon"])
    assert small_corpus_defaults(told, 100_000, tokens_per_step, None, None)[0] is told
    # under train.max_minutes the measured pace decides: 90 s at 0.05 s a step is 1,800 steps
    budget = load_config(None, ["train.max_minutes=1.5"])
    chosen, note = small_corpus_defaults(budget, 1_000_000, tokens_per_step, lambda timed: 0.05, None)
    assert chosen.train.optimizer == "adamw" and "about 7.4 times" in note
    # under a budget the batch halves (more, smaller steps in the same time), unless the user chose it;
    # a run of train.max_steps keeps the tokens per step it asked for
    assert chosen.train.batch_size == SMALL_BATCH and f"{SMALL_BATCH} sequences a step" in note
    # a longer run peaks lower: 7.4 epochs of 1M tokens at 16 x 128 are ~3,600 steps
    assert chosen.train.lr == recipe_lr(3600) == LOWEST_LR and "for ~3,600 steps" in note
    assert recipe_lr(500) == RECIPE["lr"] > recipe_lr(1200) > recipe_lr(2000) > recipe_lr(1e5) == LOWEST_LR
    assert small.train.batch_size == 32 and "sequences a step" not in small_corpus_defaults(config, 100_000, tokens_per_step, None, None)[1]
    for told in (["train.batch_size=32"], ["train.grad_accum=1"]):
        mine = load_config(None, ["train.max_minutes=1.5"] + told)
        picked, note = small_corpus_defaults(mine, 1_000_000, tokens_per_step, lambda timed: 0.05, None)
        assert picked.train.optimizer == "adamw" and picked.train.batch_size == 32 and "sequences" not in note
    again, note = small_corpus_defaults(budget, 1_000_000, tokens_per_step, None, {"train": dict(RECIPE, batch_size=SMALL_BATCH)})
    assert again.train.batch_size == SMALL_BATCH and note is None  # resumed: the batch it started with
    assert small_corpus_defaults(budget, 1_000_000, tokens_per_step, None, None)[0] is budget  # cannot tell
    # resuming keeps what the run started with, whatever it would choose now
    resumed, note = small_corpus_defaults(config, 1_000_000, tokens_per_step, None, {"train": dict(RECIPE)})
    assert resumed.train.optimizer == "adamw" and note is None
    # a run started before the recipe decayed harder keeps the decay it started with
    older, _ = small_corpus_defaults(config, 100_000, tokens_per_step, None, {"train": dict(RECIPE, weight_decay=0.1)})
    assert older.train.weight_decay == 0.1
    kept, _ = small_corpus_defaults(config, 100_000, tokens_per_step, None, {"train": {
        "optimizer": "muon", "lr": 2e-2, "min_lr": 2e-3, "schedule": "wsd"}})
    assert kept.train.optimizer == "muon"


def test_a_run_with_time_for_many_passes_trains_with_dropout_counted_at_its_own_pace():
    from lmtrain.small_data import (DROPOUT, DROPOUT_MAX_EPOCHS, DROPOUT_WEIGHT_DECAY, MAX_EPOCHS, WEIGHT_DECAY,
                                    recipe_lr, small_corpus_defaults)

    tokens_per_step = 32 * 128
    budget = load_config(None, ["train.max_minutes=5"])
    timed = []

    def pace(config):  # 0.05 s for 32 sequences; dropout costs half as much again (attention's, on a CPU)
        timed.append((config.model.dropout, config.train.batch_size))
        return 0.05 * config.train.batch_size / 32 * (1.5 if config.model.dropout else 1.0)

    # 300 s at 0.05 s a step: 6,000 steps of 4,096 tokens, 123 passes over 200K tokens; with
    # dropout, timed as it trains (16 sequences a step), 81.9
    chosen, note = small_corpus_defaults(budget, 200_000, tokens_per_step, pace, None)
    assert chosen.model.dropout == DROPOUT and timed == [(0.0, 32), (DROPOUT, 16)]
    assert chosen.train.max_epochs == DROPOUT_MAX_EPOCHS > MAX_EPOCHS and chosen.train.optimizer == "adamw"
    steps = DROPOUT_MAX_EPOCHS * 200_000 / (16 * 128)  # 3,125: with dropout the rate stays higher for longer
    assert chosen.train.lr == pytest.approx(recipe_lr(steps, dropout=True)) and recipe_lr(steps, True) > recipe_lr(steps)
    assert f"dropout {DROPOUT:g}" in note and "about 81.9 times" in note and "model.dropout the dropout" in note
    # Time for 24 passes without dropout, 16 with it: no dropout, the plain recipe's cap.
    timed.clear()
    minutes = 24 * 200_000 / tokens_per_step * 0.05 / 60
    plain, note = small_corpus_defaults(load_config(None, [f"train.max_minutes={minutes}"]), 200_000, tokens_per_step,
                                        pace, None)
    assert plain.model.dropout == 0.0 and plain.train.max_epochs == MAX_EPOCHS and "dropout" not in note
    # dropout regularises too: with it the weight decay is half as strong
    assert (plain.train.weight_decay, chosen.train.weight_decay) == (WEIGHT_DECAY, DROPOUT_WEIGHT_DECAY)
    assert f"weight decay {WEIGHT_DECAY:g}" in note
    assert timed == [(0.0, 32), (DROPOUT, 16)] and "about 24.0 times" in note
    timed.clear()  # fewer than DROPOUT_PASSES even without it: nothing more to time
    small_corpus_defaults(load_config(None, ["train.max_minutes=0.5"]), 200_000, tokens_per_step, pace, None)
    assert timed == [(0.0, 32)]
    # The user's dropout is theirs, 0 included; a resumed run keeps the dropout it was trained with.
    for told in ("0", "0.3"):
        mine, note = small_corpus_defaults(load_config(None, ["train.max_minutes=5", f"model.dropout={told}"]), 200_000,
                                           tokens_per_step, pace, None)
        assert mine.model.dropout == float(told) and "dropout" not in note.replace("model.dropout", "")
    resumed, note = small_corpus_defaults(budget, 200_000, tokens_per_step, None,
                                          {"train": {"optimizer": "adamw"}, "model": {"dropout": DROPOUT}})
    assert resumed.model.dropout == DROPOUT and note is None
    # a crafted checkpoint's values are checked as a config file's would be: compared on resume, never adopted
    for odd in ({"model": {"dropout": "x"}}, {"model": [1]}, {"model": {"dropout": True}}, {"model": {"dropout": 5.0}},
                {"model": {"dropout": float("nan")}}, {}):
        assert small_corpus_defaults(budget, 200_000, tokens_per_step, None, odd)[0].model.dropout == 0.0
    for odd in ({"lr": "x"}, {"lr": -1.0}, {"optimizer": "sgd"}, {"batch_size": 0}):
        assert small_corpus_defaults(budget, 200_000, tokens_per_step, None, {"train": odd})[0].train == budget.train


@pytest.mark.slow
def test_a_small_corpus_run_says_what_it_chose_and_resumes_with_it(tiny_run, monkeypatch):
    import yaml

    from lmtrain import small_data

    config, run_dir = tiny_run
    monkeypatch.setattr(small_data, "DROPOUT_PASSES", 2.0)  # this run's 2.6 passes count as many: dropout too
    raw = yaml.safe_load(config.read_text())
    for key in ("lr", "min_lr"):  # the tiny config chooses them; a small-corpus run chooses only if the user did not
        raw["train"].pop(key)
    config.write_text(yaml.safe_dump(raw))
    first = train(load_config(config, ["train.max_steps=400", "train.eval_every=400", "train.checkpoint_every=200"]))
    log = (run_dir / "train.log").read_text()
    assert "small corpus: the run would see its" in log and "AdamW at 0.003" in log and ", dropout 0.1" in log
    written = load_config(run_dir / "config.yaml")
    assert written.train.optimizer == "adamw" and written.model.dropout == 0.1
    assert written.train.weight_decay == small_data.DROPOUT_WEIGHT_DECAY and ", weight decay 1 (" in log
    # resumed, it keeps them: the dropout too, which the checkpoint's model must match
    more = train(load_config(config, ["train.max_steps=420", "train.eval_every=400", "train.checkpoint_every=200"]))
    assert more.resumed_from == "step-00000400" and first.step == 400


def test_a_small_corpus_gets_a_smaller_vocabulary_unless_the_config_sets_one():
    from lmtrain.small_data import corpus_vocab

    default = load_config(None)  # the embedded default: 4,096 pieces, not set by the user
    vocab, note = corpus_vocab(default, 400_000)
    assert vocab == 1024 and "0.4 MB of training text" in note and "1,024 pieces rather than 4,096" in note
    assert corpus_vocab(default, 600_000) == (4096, None)  # code of this size gains nothing from fewer pieces
    for told in (["tokenizer.vocab_size=4096"], ["tokenizer.model=unigram"]):
        assert corpus_vocab(load_config(None, told), 400_000) == (4096, None)


def test_the_stages_keep_the_vocabulary_chosen_for_the_corpus_and_refuse_another_set_later(tmp_path, text_corpus):
    import json

    import yaml

    from lmtrain.errors import RunDirError
    from lmtrain.prepare import build_shards, train_tokenizer

    run_dir = tmp_path / "run"
    sets = [f"run.dir={run_dir}", f"data.source={text_corpus}", "data.val_fraction=0.1"]
    stats = train_tokenizer(load_config(None, sets))
    assert stats.settings["chosen"] == ["tokenizer.vocab_size"] and stats.settings["tokenizer"]["vocab_size"] == 1024
    build_shards(load_config(None, sets))  # the same config: the chosen vocabulary stands
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["tokenizer"]["vocab_size"] == 1024
    assert build_shards(load_config(None, sets + ["tokenizer.vocab_size=1024"])).up_to_date  # said out loud
    with pytest.raises(RunDirError, match="trained with tokenizer.vocab_size=1024, the config now says 4096"):
        build_shards(load_config(None, sets + ["tokenizer.vocab_size=4096"]))
    # a crafted stats.json is a mismatch or nothing, never a traceback
    stats_path = run_dir / "tokenizer" / "stats.json"
    saved = json.loads(stats_path.read_text())
    for settings in ({**saved["settings"], "chosen": 5}, {**saved["settings"], "tokenizer": [1]},
                     {**saved["settings"], "tokenizer": {**saved["settings"]["tokenizer"], "vocab_size": "x"}}):
        stats_path.write_text(json.dumps({**saved, "settings": settings}))
        try:
            build_shards(load_config(None, sets))
        except RunDirError as exc:
            assert "trained with tokenizer.vocab_size" in str(exc)
