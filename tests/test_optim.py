"""train.optimizer: muon. Which parameters Muon updates, the schedule driving both optimisers,
both states in the checkpoint (weights_only), a falling loss. (Resuming across optimisers is
refused: tests/test_train.py, with the other refusals to resume.)"""

from __future__ import annotations

import pytest
import torch

from lmtrain.checkpoint import load_optimizer_state
from lmtrain.config import load_config
from lmtrain.optim import make_optimizer, set_lr
from lmtrain.schedule import Schedule, lr_at
from lmtrain.step import build_model
from lmtrain.train import train


def test_the_schedule_scales_both_learning_rates():
    cfg = load_config(None, ["train.optimizer=muon", "train.lr=0.004", "train.muon_lr=0.03", "train.min_lr=0.0004",
                             "train.warmup_steps=10", "train.max_steps=100", "train.schedule=cosine"])
    optimizer = make_optimizer(build_model(cfg.model, 300), cfg.train, torch.device("cpu"))
    for step in (0, 5, 50, 99):
        lr = lr_at(step, Schedule.of(cfg.train))
        set_lr(optimizer, lr)
        assert {g["lr"] for g in optimizer.adamw.param_groups} == {lr}
        assert [g["lr"] for g in optimizer.muon.param_groups] == [pytest.approx(lr * 0.03 / 0.004)]


@pytest.mark.slow
def test_muon_trains_and_checkpoints_both_states(tiny_run):
    config, run_dir = tiny_run
    result = train(load_config(config, ["train.max_steps=20", "train.optimizer=muon"]))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5
    state = load_optimizer_state(result.checkpoint)  # torch.load(weights_only=True)
    assert set(state["optimizer"]) == {"adamw", "muon"}
    momentum = [s["momentum_buffer"] for s in state["optimizer"]["muon"]["state"].values()]
    assert momentum and all(m.dim() == 2 for m in momentum)

