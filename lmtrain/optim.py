"""The optimiser and its learning-rate schedule.

To add an optimiser: a ``train.optimizer`` choice in ``lmtrain.config.TrainConfig`` and a branch
in ``make_optimizer``; the training step, the checkpoints (``optimizer.state_dict()``) and the
benchmarks pick it up from there.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmtrain.config import TrainConfig


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based): warmup, then the schedule."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return tc.lr
    if tc.schedule == "wsd":
        decay_steps = max(1, round(tc.decay_fraction * tc.max_steps))
        decay_start = tc.max_steps - decay_steps
        if step < decay_start:
            return tc.lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return tc.lr - (tc.lr - tc.min_lr) * progress
    span = max(1, tc.max_steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weight matrices of linear layers only: not norms, biases or embedding tables
    (the tied LM head is the embedding table)."""
    embeddings = {id(model.wte.weight)} | ({id(model.wpe.weight)} if model.wpe is not None else set())
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (fused kernels on CUDA)."""
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
