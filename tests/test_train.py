"""Training: the loss falls, resume is exact, signals checkpoint, corruption and divergence are caught."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, wait_for_line
from lmtrain.config import load_config
from lmtrain.errors import CheckpointError, LmtrainError
from lmtrain.rundir import fork_run
from lmtrain.schedule import Schedule, lr_at
from lmtrain.train import TrainingError, train


def weights(run_dir, name="latest"):
    target = (run_dir / "checkpoints" / name).read_text().strip()
    return load_file(str(run_dir / "checkpoints" / target / "model.safetensors"))


def losses(result):
    return {h["step"]: h["loss"] for h in result.history if "loss" in h}


@pytest.mark.slow
def test_loss_falls_and_artifacts_exist(tiny_run):
    config, run_dir = tiny_run
    result = train(load_config(config, ["train.max_steps=40"]))
    history = losses(result)
    assert sum(list(history.values())[-5:]) < sum(list(history.values())[:5])
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert vals[-1] < vals[0]
    assert result.val_bpb is not None and result.val_bpb > 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000040"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-00000030", "step-00000040"]
    assert (ckpts / "best").exists()
    assert "step 40: checkpoint" in (run_dir / "train.log").read_text()


def interrupted_at(stop_step, cfg, monkeypatch):
    """Train until a SIGTERM arrives during step ``stop_step``; return the partial history."""
    from lmtrain.step import StepRunner
    from lmtrain.train import TrainingInterrupted

    real_run = StepRunner.run

    def step_then_signal(self, step, batches, lr, timings=None):
        out = real_run(self, step, batches, lr, timings)
        if step + 1 == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(StepRunner, "run", step_then_signal)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    monkeypatch.setattr(StepRunner, "run", real_run)
    assert info.value.step == stop_step and info.value.signum == signal.SIGTERM
    return info.value


SPEEDRUN_OPTIONS = ["train.optimizer=muon", "model.qk_norm=true", "model.mlp=relu2", "model.logit_softcap=15",
                    "model.zero_init_proj=true", "model.tie_embeddings=false", "model.pos_embedding=rope"]


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], SPEEDRUN_OPTIONS], ids=["default", "muon-and-architecture-options"])
def test_exact_resume_is_bit_identical(tmp_path, tiny_run, monkeypatch, options):
    config, run_dir = tiny_run
    straight = train(load_config(config, ["train.max_steps=20", "model.dropout=0.1", *options]))
    straight_weights = weights(run_dir)

    other = tmp_path / "other"
    overrides = [f"run.dir={other}", "model.dropout=0.1", *options]
    fork_run(run_dir, other)
    first = interrupted_at(10, load_config(config, overrides + ["train.max_steps=20"]), monkeypatch)
    second = train(load_config(config, overrides + ["train.max_steps=20"]))
    assert second.resumed_from == "step-00000010" and second.start_step == 10
    resumed_weights = weights(other)
    assert straight_weights.keys() == resumed_weights.keys()
    for key in straight_weights:
        assert torch.equal(straight_weights[key], resumed_weights[key]), key
    assert {**losses(first), **losses(second)} == losses(straight)
    assert max(losses(first)) == 10


@pytest.mark.slow
def test_raising_max_steps_resumes_and_finished_run_is_done(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=10"]))
    done = train(load_config(config, ["train.max_steps=10"]))
    assert done.already_done and done.step == 10
    more = train(load_config(config, ["train.max_steps=15"]))
    assert more.step == 15 and more.resumed_from == "step-00000010"


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    ("model.n_layer=3", r"model.n_layer: checkpoint 2, config 3.*--restart"),
    ("train.optimizer=muon", r"trained with train.optimizer adamw.*model.init_from=.*--restart"),
], ids=["shape", "optimizer"])
def test_resume_with_another_shape_or_optimizer_names_what_differs(tiny_run, change, message):
    config, _ = tiny_run
    train(load_config(config, ["train.max_steps=10"]))
    with pytest.raises(CheckpointError, match=message):
        train(load_config(config, ["train.max_steps=20", change]))
    result = train(load_config(config, ["train.max_steps=5", change]), restart=True)
    assert result.step == 5 and result.resumed_from is None
    assert list(run_dir_aside(config))


def run_dir_aside(config):
    run_dir = load_config(config).run_dir
    return [p for p in run_dir.iterdir() if p.name.startswith("checkpoints.old-")]


@pytest.mark.slow
def test_corrupt_or_incomplete_checkpoint_is_detected(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=10"]))
    ckpt = run_dir / "checkpoints" / "step-00000010"
    model_file = ckpt / "model.safetensors"
    blob = model_file.read_bytes()
    model_file.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        train(load_config(config, ["train.max_steps=20"]))
    model_file.write_bytes(blob)
    (ckpt / "optimizer.pt").rename(ckpt / "optimizer.bak")
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        train(load_config(config, ["train.max_steps=20"]))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lmtrain-pwned-by-pickle",))


@pytest.mark.slow
def test_malicious_pickle_is_refused_without_running(tiny_run):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=10"]))
    marker = "/tmp/lmtrain-pwned-by-pickle"
    if os.path.exists(marker):
        os.unlink(marker)
    with open(run_dir / "checkpoints" / "step-00000010" / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": _Payload()}, f)
    with pytest.raises(CheckpointError, match="refused or is corrupt"):
        train(load_config(config, ["train.max_steps=20"]))
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_stop(tiny_run, monkeypatch):
    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=10"]))
    before = weights(run_dir)
    from lmtrain import model as model_module

    real_forward = model_module.GPT.forward

    def nan_forward(self, idx, targets=None, cache=None, loss_fn=None):
        logits, loss = real_forward(self, idx, targets, cache, loss_fn)
        return logits, (loss * float("nan") if loss is not None else None)

    monkeypatch.setattr(model_module.GPT, "forward", nan_forward)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row.*last good checkpoint is untouched"):
        train(load_config(config, ["train.max_steps=20", "train.max_bad_steps=3"]))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000010"
    after = weights(run_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lr_schedules():
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=10",
                             "train.max_steps=100"]).train
    schedule = Schedule.of(cfg)
    assert lr_at(0, schedule) == pytest.approx(1e-4)
    assert lr_at(9, schedule) == pytest.approx(1e-3)
    assert lr_at(99, schedule) == pytest.approx(1e-4)  # the last step ends the decay
    cfg.schedule = "wsd"
    cfg.decay_fraction = 0.2
    schedule = Schedule.of(cfg)
    assert lr_at(50, schedule) == pytest.approx(1e-3)
    assert lr_at(79, schedule) == pytest.approx(1e-3)
    assert lr_at(99, schedule) == pytest.approx(1e-4)
    cfg.schedule = "constant"
    assert lr_at(99, Schedule.of(cfg)) == pytest.approx(1e-3)


@pytest.mark.slow
def test_tensorboard_has_the_tags(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, run_dir = tiny_run
    train(load_config(config, ["train.max_steps=10", "train.sample_every=5"]))
    train(load_config(config, ["train.max_steps=20", "train.sample_every=5"]))  # resumed: appends
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/memory_mb",
                "val/loss", "val/ppl", "val/bpb"):
        assert tag in scalars, tag
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 21))  # no duplicates after the resume
    assert any(t.startswith("sample") for t in acc.Tags()["tensors"])


@pytest.mark.slow
def test_training_needs_shards(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(LmtrainError, match="run `lmtrain tokenize`"):
        train(cfg)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_143(tiny_run):
    config, run_dir = tiny_run
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmtrain", "train", "--config", str(config), "--set", "train.max_steps=100000",
         "--set", "train.checkpoint_every=100000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(run_dir / "train.log", "step 5:", poll=0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "resume with: lmtrain train --config" in err
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert step >= 5
    resumed = run_cli("train", "--config", str(config), "--set", f"train.max_steps={step + 2}",
                      "--set", "train.checkpoint_every=100000")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {latest}" in resumed.stderr
