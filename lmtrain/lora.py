"""LoRA (``train.lora_*``): fine-tune a model through small low-rank adapters, its weights frozen.

A projection W (out x in) of the base model gets, on some of its output rows, the update B A
scaled by alpha / r, with A (r x in) and B (rows x r) (Hu et al. 2021, "LoRA"):

    y = x W^T + (alpha / r) * dropout(x) A^T B^T

B starts at zero, so training starts exactly at the base model. Only A and B (and with
``train.lora_train_norms`` the normalisation weights) are trained: the optimiser keeps state for
them alone, and the frozen base needs no gradients, which is where the memory goes.

lmtrain fuses attention's q, k and v into one matrix (``attn.qkv``) and SwiGLU's gate and up into
another (``mlp.up``). Each projection named in ``train.lora_targets`` gets its own adapter on its
own rows of the fused matrix: exactly what an adapter on a Llama's separate q_proj, k_proj, ...
computes, so the adapters export one to one to peft's layout (``lmtrain export --format peft``).

A LoRA run's checkpoints hold the trained tensors only (adapters, trained norms), their optimiser
state, and a record of the base: where it was read from (``model.init_from``, resolved to one
checkpoint or directory) and a fingerprint of its weights. Whoever loads the checkpoint (resume,
sample, eval, export, another run's ``model.init_from``) reads the base again, checks the
fingerprint, and puts the adapters on top; for inference they are merged into the weights
(W + alpha/r B A), so a LoRA model samples and evaluates as fast as any other.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmtrain.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class LoraSpec:
    """The adapters' shape: the ``train.lora_*`` keys that decide what a checkpoint holds."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    train_norms: bool
    dropout: float = 0.0  # not part of the checkpoint's shape: may change on resume

    @classmethod
    def of(cls, tc) -> "LoraSpec | None":
        """From the ``train`` section; None when LoRA is off (``train.lora_rank`` 0)."""
        if not tc.lora_rank:
            return None
        return cls(tc.lora_rank, tc.lora_alpha, tuple(tc.lora_targets), tc.lora_train_norms, tc.lora_dropout)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "train_norms": self.train_norms, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraSpec":
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]), bool(d["train_norms"]),
                   float(d.get("dropout", 0.0)))

    def differences(self, other: "LoraSpec") -> list[str]:
        """``train.lora_KEY: checkpoint A, config B`` for each shape key that differs."""
        pairs = [("lora_rank", self.rank, other.rank), ("lora_alpha", self.alpha, other.alpha),
                 ("lora_targets", list(self.targets), list(other.targets)),
                 ("lora_train_norms", self.train_norms, other.train_norms)]
        return [f"train.{key}: checkpoint {a!r}, config {b!r}" for key, a, b in pairs if a != b]


@dataclass
class LoraRecord:
    """What a LoRA checkpoint records besides its tensors: the spec and the base it adapts."""

    spec: LoraSpec
    base: str  # the resolved base: an lmtrain checkpoint directory or a Hugging Face directory
    base_fingerprint: str
    init_from: str  # model.init_from as the config wrote it
    base_relative: str | None = None  # the base relative to the run directory: found again after a move

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "base": self.base, "base_fingerprint": self.base_fingerprint,
                "init_from": self.init_from, "base_relative": self.base_relative}

    def base_path(self, run_dir: Path) -> str:
        """Where the base is now: as recorded, or where it is relative to ``run_dir`` when the
        recorded path is gone (a project folder moved with its runs and models inside)."""
        if self.base_relative is not None and not Path(self.base).exists():
            moved = Path(run_dir) / self.base_relative
            if moved.exists():
                return str(moved)
        return self.base

    @classmethod
    def from_state(cls, state: dict[str, Any], path: Path) -> "LoraRecord":
        """The record in a checkpoint's ``state.json`` (at ``path``); CheckpointError if malformed."""
        d = state.get("lora")
        try:
            relative = d.get("base_relative")
            return cls(LoraSpec.from_dict(d), str(d["base"]), str(d["base_fingerprint"]), str(d["init_from"]),
                       None if relative is None else str(relative))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: its lora record is {d!r}; the checkpoint is corrupt") from None


def is_lora_checkpoint(state: dict[str, Any]) -> bool:
    return state.get("lora") is not None


# --------------------------------------------------------------------------------------------
# What the adapters attach to
# --------------------------------------------------------------------------------------------


def target_rows(config, target: str) -> tuple[str, int, int]:
    """Where ``target`` lives in a block of a model of ``config`` (a ``GPTConfig``): the linear
    layer (relative to the block) and the rows [start, stop) of its output that are the target.
    The fused qkv holds q's rows (n_head heads), then k's and v's (the key/value heads each)."""
    C = config.n_embd
    q_rows, kv_rows = config.n_head * config.head_size, config.kv_heads * config.head_size
    if target in ("q", "k", "v"):
        start = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[target]
        return "attn.qkv", start, start + (q_rows if target == "q" else kv_rows)
    if target == "o":
        return "attn.proj", 0, C
    if target == "down":
        return "mlp.proj", 0, C
    H = config.mlp_width
    if config.mlp == "swiglu":
        return ("mlp.up", 0, H) if target == "gate" else ("mlp.up", H, 2 * H)
    if target == "gate":
        raise ConfigError(f"train.lora_targets: gate is SwiGLU's gate projection, and this model has "
                          f"model.mlp {config.mlp} (no gate); use up and down for its MLP")
    return "mlp.up", 0, H


def check_config(config, sharded: bool) -> None:
    """Refuse, in one line, the settings LoRA cannot train with that need the resolved config (the
    architecture is the base's) or the process count; the config's own combinations (init_from,
    the optimizer) are refused when it is loaded (``config._check_across_sections``)."""
    tc = config.train
    if not tc.lora_rank:
        return
    if sharded:
        raise ConfigError("train.parallel fsdp shards weights that train; a LoRA run trains only its small adapters, "
                          "so each process holds the frozen base whole: use train.parallel: ddp")
    from lmtrain.model import GPTConfig

    shape = GPTConfig.of(config.model, 1)
    for target in tc.lora_targets:
        target_rows(shape, target)  # gate without SwiGLU is refused there


# --------------------------------------------------------------------------------------------
# The adapted layer
# --------------------------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` with adapters on some of its output rows (a fused matrix's parts).

    It keeps the base layer's ``weight`` and ``bias`` under their names, so the model's state
    dict has the base's keys plus ``lora_A.<target>`` and ``lora_B.<target>``.
    """

    def __init__(self, base: nn.Linear, rows: dict[str, tuple[int, int]], spec: LoraSpec) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rows = dict(sorted(rows.items(), key=lambda item: item[1]))  # in the order of the rows
        self.scale = spec.scale
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterDict({t: nn.Parameter(torch.empty(spec.rank, self.in_features, **kw)) for t in rows})
        self.lora_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(stop - start, spec.rank, **kw))
                                        for t, (start, stop) in rows.items()})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's (and peft's) initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = self.dropout(x)
        pieces, at = [], 0
        for target, (start, stop) in self.rows.items():
            delta = F.linear(F.linear(h, self.lora_A[target]), self.lora_B[target]) * self.scale
            if start == 0 and stop == self.out_features:
                return y + delta  # the adapter covers the whole layer
            if start > at:
                pieces.append(y[..., at:start])
            pieces.append(y[..., start:stop] + delta)
            at = stop
        if at < self.out_features:
            pieces.append(y[..., at:])
        return torch.cat(pieces, dim=-1)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function: W + alpha/r B A on each target's rows."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            weight = self.weight.detach().clone()
            for target, (start, stop) in self.rows.items():
                weight[start:stop] += self.scale * (self.lora_B[target] @ self.lora_A[target])
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


NORMS = (nn.LayerNorm, nn.RMSNorm)


def add_adapters(model: nn.Module, spec: LoraSpec) -> None:
    """Freeze ``model`` (an ``lmtrain.model.GPT``) and put ``spec``'s adapters on its blocks, in
    place; with ``spec.train_norms`` the normalisation weights train too."""
    from lmtrain.model import QKNorm

    model.requires_grad_(False)
    for block in model.blocks:
        layers: dict[str, dict[str, tuple[int, int]]] = {}
        for target in spec.targets:
            name, start, stop = target_rows(model.config, target)
            layers.setdefault(name, {})[target] = (start, stop)
        for name, rows in layers.items():
            parent_name, attr = name.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, attr, LoraLinear(getattr(parent, attr), rows, spec))
    if spec.train_norms:
        for module in model.modules():
            if isinstance(module, NORMS + (QKNorm,)):
                module.requires_grad_(True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a LoRA checkpoint holds: every trained parameter, by its name in the model."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load a LoRA checkpoint's tensors into the adapted ``model``; CheckpointError naming what
    does not fit."""
    from lmtrain.checkpoint import check_tensors_fit

    expected = trainable_state(model)
    check_tensors_fit(tensors, expected, path, what="adapters", holder="the adapters")
    with torch.no_grad():
        for name, value in tensors.items():
            expected[name].copy_(value)  # (detached views of the parameters: copied in place)


def merge_adapters(model: nn.Module) -> None:
    """Replace every ``LoraLinear`` by its merged ``nn.Linear``, in place (for inference)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                setattr(module, name, child.merged())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trained, total) parameters, each shared tensor counted once."""
    seen, trained, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trained += p.numel() if p.requires_grad else 0
    return trained, total


def training_flops_per_token(model: nn.Module) -> float:
    """FLOPs a training step spends per token (for MFU): the model's 6N + attention, less the 2N
    of weight gradients that frozen matrices (a LoRA run's base) never compute; their input
    gradients (2N) still flow through them to the adapters below."""
    frozen = sum(p.numel() for name, p in model.named_parameters()
                 if not p.requires_grad and p.dim() == 2 and name not in ("wte.weight", "wpe.weight"))
    head = model.lm_head.weight  # a real matmul even when it is the (tied) embedding table
    if model.config.tie_embeddings and not head.requires_grad:
        frozen += head.numel()
    return model.flops_per_token() - 2 * frozen


# --------------------------------------------------------------------------------------------
# The base
# --------------------------------------------------------------------------------------------


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's weights (the padded vocabulary rows, never used, left out): two bases
    with the same fingerprint compute the same function."""
    vocab = model.config.vocab_size
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in ("wte.weight", "lm_head.weight"):
            tensor = tensor[:vocab]
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(data.shape)};".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:32]


def adapt(model: nn.Module, spec: LoraSpec, base, init_from: str, run_dir: Path) -> LoraRecord:
    """Load the base (a ``pretrained.Pretrained``) into ``model``, fingerprint it, add the adapters;
    the record stays on the model (``record_of``), where checkpoints and resume find it."""
    base.weights(model)
    where = base.source.path.resolve()
    record = LoraRecord(spec, str(where), fingerprint(model), init_from,
                        os.path.relpath(where, Path(run_dir).resolve()))
    add_adapters(model, spec)
    model.lora_record = record
    return record


def record_of(model: nn.Module) -> LoraRecord | None:
    """The record ``adapt`` left on a model (None for a model trained whole)."""
    return getattr(model, "lora_record", None)


def check_same_base(saved: LoraRecord, current: LoraRecord, path: Path) -> None:
    """Adapters fit only the weights they were trained on: refuse to resume on another base."""
    if saved.base_fingerprint != current.base_fingerprint:
        raise CheckpointError(
            f"cannot resume from {path}: its adapters were trained on {saved.base} (fingerprint "
            f"{saved.base_fingerprint[:12]}), and model.init_from now gives other weights ({current.base}, "
            f"{current.base_fingerprint[:12]}); point model.init_from back at that base, or use --restart "
            "to train new adapters on this one (the old checkpoints are kept aside)")


