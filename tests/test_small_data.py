"""Small corpora: the run knows how often it repeats its data, keeps its best evaluation as a
checkpoint whatever train.checkpoint_every says, and what a user reads afterwards is that one."""

from __future__ import annotations

import re

import pytest

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
