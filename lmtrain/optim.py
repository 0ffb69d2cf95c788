"""The optimiser (the learning-rate schedule it follows is lmtrain/schedule.py).

To add an optimiser: a ``train.optimizer`` choice in ``lmtrain.config.TrainConfig`` and a branch
in ``make_optimizer``; the training step, the checkpoints (``optimizer.state_dict()``) and the
benchmarks pick it up from there.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmtrain.config import TrainConfig
from lmtrain.fsdp import is_dtensor


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


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device):
    """AdamW over ``param_groups`` (fused kernels); with ``train.optimizer: muon``, Muon for
    the block matrices and AdamW for the rest (``MuonWithAdamW``)."""
    if tc.optimizer == "muon":
        return MuonWithAdamW(model, tc, device)
    return _adamw(param_groups(model, tc.weight_decay), tc, device)


def _adamw(groups: list[dict[str, Any]], tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel on a CPU too: one pass over each parameter's state instead of the foreach
    # path's dozen (135M parameters: 70 ms a step against 230-470 ms on a 2-core CPU). Sharded
    # (FSDP) parameters keep the foreach path, which DTensor runs everywhere.
    sharded = any(is_dtensor(p) for g in groups for p in g["params"])
    fused = device.type in ("cuda", "cpu") and not sharded
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused)


def set_lr(optimizer, lr: float) -> None:
    """Set the schedule's learning rate ``lr`` (train.lr's scale); a group with an ``lr_scale``
    (Muon's) gets ``lr * lr_scale``, so one schedule drives both optimisers."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def muon_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters Muon updates: the 2-D weight matrices inside the transformer blocks.

    Fused matrices (attention's qkv, SwiGLU's gate+up) are orthogonalised whole, as
    ``torch.optim.Muon`` does with any 2-D parameter. Orthogonalising the (3C, C) qkv update whole
    gives its C singular values ~1, spread over three blocks, where separate q, k and v would each
    get C; Muon's ``original`` learning-rate adjustment, sqrt(max(1, rows/cols)) = sqrt(3) for
    qkv, restores that scale on average, which is why splitting was not worth a Muon of our own.
    """
    return [p for name, p in model.blocks.named_parameters() if p.dim() == 2 and p.requires_grad]


class MuonWithAdamW:
    """``torch.optim.Muon`` for ``muon_matrices`` and AdamW for everything else, stepping together.

    To the training step, the grad scaler and the checkpoints it is one optimiser: ``param_groups``
    (both optimisers' groups), ``step``, ``zero_grad``, and a ``state_dict`` of
    ``{"adamw": ..., "muon": ...}``. Muon's group carries ``lr_scale = muon_lr / lr``, so the
    learning-rate schedule (``set_lr``) scales both the same way. torch.optim.Muon lacks nothing
    this needs on one GPU, where it is used as it is; on a CPU or sharded (FSDP), ``_Muon``.
    """

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> None:
        if not hasattr(torch.optim, "Muon"):
            from lmtrain.errors import ConfigError

            raise ConfigError(f"train.optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is {torch.__version__}")
        matrices = muon_matrices(model)
        ids = {id(p) for p in matrices}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in param_groups(model, tc.weight_decay)]
        self.adamw = _adamw([g for g in rest if g["params"]], tc, device)
        sharded = any(is_dtensor(p) for p in matrices)
        muon = torch.optim.Muon if device.type == "cuda" and not sharded else _Muon
        self.muon = muon(matrices, lr=tc.muon_lr, weight_decay=tc.muon_weight_decay, momentum=tc.muon_momentum,
                         nesterov=True, ns_steps=tc.muon_ns_steps, adjust_lr_fn=tc.muon_adjust_lr)
        if muon is _Muon:
            # torch's Newton-Schulz dtype on GPUs (bf16, fast there); fp32 on CPUs (see _Muon).
            self.muon.ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for group in self.muon.param_groups:
            group["lr_scale"] = tc.muon_lr / tc.lr

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict:
        """Per-parameter state of both (the same dicts the two optimisers hold)."""
        return {**self.adamw.state, **self.muon.state}

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"adamw", "muon"}:
            raise ValueError(f"expected the state of Muon and AdamW, got {sorted(state)[:4]}")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


class _Muon(torch.optim.Muon if hasattr(torch.optim, "Muon") else torch.optim.Optimizer):
    """``torch.optim.Muon``'s update, with two differences where torch's does not serve:

    - On a CPU the Newton-Schulz iteration runs in fp32 (``ns_dtype``): torch's always computes it
      in bf16, which GPUs do fast but CPUs without bf16 matrix units emulate, about 25x slower than
      fp32 (one 768x128 orthogonalisation: 170 ms against 6 ms on our 2-core CPU), enough to halve
      the default model's training throughput.
    - Under FSDP (``train.parallel: fsdp``) each rank holds a slice of rows of every matrix, and
      orthogonalising a slice is not orthogonalising the matrix. The update is gathered whole
      (``full_tensor``, the volume of one forward's weight gather), orthogonalised on every rank
      alike, and each rank keeps its rows: the arithmetic of one process, at the price of every
      rank repeating the Newton-Schulz work (a Muon that spreads whole matrices over the ranks, as
      nanochat's does, would not repeat it).

    The state (one momentum buffer per matrix, sharded like its matrix), the update rule and the
    learning-rate adjustment are torch's.
    """

    ns_dtype = torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = self._orthogonalise(update, group)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * _lr_ratio(group["adjust_lr_fn"], p.shape))

    def _orthogonalise(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        args = (group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
        if not is_dtensor(update):
            return newton_schulz(update, *args)
        from torch.distributed.tensor import distribute_tensor

        whole = newton_schulz(update.full_tensor(), *args)
        return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)



def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (Keller Jordan's), in ``dtype``: an
    approximately orthogonal matrix with ``grad``'s singular vectors."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning-rate factor."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))  # match_rms_adamw
