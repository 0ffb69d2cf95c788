"""One training step, and the one function that builds it.

``build_training(config, vocab_size, device, precision)`` makes the model, the optimiser, the
gradient scaler and the step runner exactly as ``lmtrain train`` uses them; the trainer, the
benchmarks (``scripts/bench_train.py``) and the speedrun all call it, so a benchmark times the
very step training runs. ``StepRunner.run(step, batches, lr)`` is one optimiser step: ``grad_accum``
micro-batches, clipping, and the update unless the loss or gradient is non-finite.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmtrain import distributed as dist_util
from lmtrain.config import Config, ModelConfig, TrainConfig
from lmtrain.device import AMP_DTYPES, autocast, enable_fast_matmul, synchronize
from lmtrain.loss import training_loss_fn
from lmtrain.memory import apply_activation_checkpointing
from lmtrain.model import GPT, GPTConfig
from lmtrain.optim import make_optimizer, set_lr
from lmtrain.fsdp import is_sharded, sharded_run

if TYPE_CHECKING:
    from lmtrain.lora import LoraRecord


def build_model(model: ModelConfig, vocab_size: int) -> GPT:
    """A freshly initialised GPT of the ``model`` section's shape (seed the RNG first)."""
    return GPT(GPTConfig.of(model, vocab_size))


def tokens_per_step(config: Config, world_size: int = 1) -> int:
    """Tokens one optimiser step trains on, over every micro-batch and process."""
    tc = config.train
    return tc.batch_size * tc.grad_accum * world_size * config.model.block_size


def uses_compile(tc: TrainConfig, device: torch.device) -> bool:
    return tc.compile == "true" or (tc.compile == "auto" and device.type == "cuda")


def wrap_model(model: GPT, tc: TrainConfig, device: torch.device, info: dist_util.DistInfo) -> torch.nn.Module:
    """The module the training step calls: compiled (CUDA by default) and DDP-wrapped as needed.
    A sharded model is neither: its blocks were compiled before sharding (``shard_model``)."""
    enable_fast_matmul(device)
    wrapped: torch.nn.Module = model
    if sharded_run(tc, info.world_size):
        return wrapped
    if uses_compile(tc, device):
        wrapped = torch.compile(wrapped, mode=tc.compile_mode)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


@dataclass
class Training:
    """What ``build_training`` returns: the parts of training that hold state, and the step."""

    model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    runner: "StepRunner"

    @property
    def lora(self) -> "LoraRecord | None":
        """A LoRA run's spec and base (``lmtrain.lora``), as ``adapt`` left them on the model."""
        from lmtrain.lora import record_of

        return record_of(self.model)

    def snapshot(self, keep: bool) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
        """The weights and the optimiser + scaler state as a checkpoint stores them, whole; every
        rank calls this (a sharded model is gathered), the ranks that ``keep`` get them."""
        if is_sharded(self.model):
            from lmtrain.fsdp import full_model_state, full_optimizer_state

            weights, optimizer = full_model_state(self.model, keep), full_optimizer_state(self.optimizer, keep)
        elif keep:
            from lmtrain.lora import trainable_state

            # A LoRA run keeps its adapters (and trained norms) only: the base is recorded, not copied.
            weights = self.model.state_dict() if self.lora is None else trainable_state(self.model)
            optimizer = self.optimizer.state_dict()
        else:
            return None, None
        return weights, ({"optimizer": optimizer, "scaler": self.scaler.state_dict()} if keep else None)


def build_training(config: Config, vocab_size: int, device: torch.device, precision: str,
                   info: dist_util.DistInfo | None = None, restore=None, teacher=None, base=None) -> Training:
    """Model, optimiser, scaler and step for ``config``, as ``lmtrain train`` builds them.

    ``restore`` (a ``checkpoint.Resume``) loads a checkpoint's weights into the model once it is
    initialised, and its optimiser and scaler state once they exist, all before the model is
    wrapped (compiled, DDP): resuming goes through here too. ``teacher`` (an
    ``lmtrain.distill.Teacher``) makes the step distil from it (``train.distill_from``). ``base``
    (a ``pretrained.Pretrained``) is a LoRA run's base (``train.lora_rank``): loaded, frozen, and
    given the adapters, which ``restore`` then fills when resuming.
    """
    info = info or dist_util.DistInfo()
    torch.manual_seed(config.run.seed)
    model = build_model(config.model, vocab_size)
    if base is not None:
        from lmtrain.lora import LoraSpec, adapt

        adapt(model, LoraSpec.of(config.train), base, config.model.init_from, config.run_dir)
    if restore is not None:
        restore.weights(model)
    model.to(device)
    # a CPU's fused attention has no dropout and its bernoulli_ is slow: ours is 1.2-1.3x faster there
    model.drop_explicitly(device.type == "cpu")
    apply_activation_checkpointing(model, config.train.activation_checkpointing)
    if sharded_run(config.train, info.world_size):
        from lmtrain.fsdp import shard_model

        shard_model(model, config.train, device, AMP_DTYPES[precision], uses_compile(config.train, device))
    optimizer = make_optimizer(model, config.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if restore is not None:
        restore.optimizer(optimizer, scaler)
    runner = StepRunner(model, wrap_model(model, config.train, device, info), optimizer, scaler,
                        config.train, precision, device, info, teacher)
    return Training(model, optimizer, scaler, runner)


class StepRunner:
    """One optimiser step: grad_accum micro-batches, clipping, and the update unless non-finite.

    With ``timings`` (a dict) it also splits the step's time into data, forward+backward and
    optimiser, synchronising the device at each boundary to do so.
    """

    def __init__(self, model: GPT, forward_model: torch.nn.Module, optimizer, scaler, tc: TrainConfig,
                 precision: str, device: torch.device, info: dist_util.DistInfo, teacher=None) -> None:
        self.model, self.forward_model, self.optimizer, self.scaler = model, forward_model, optimizer, scaler
        self.teacher = teacher
        self.tc, self.precision, self.device, self.info = tc, precision, device, info
        self.amp_dtype = AMP_DTYPES[precision]
        self.sharded = is_sharded(model)
        self.loss_fn = training_loss_fn(device)
        self.cuda_graphs = (device.type == "cuda" and forward_model is not model
                            and tc.compile_mode in ("reduce-overhead", "max-autotune"))

    def run(self, step: int, batches, lr: float, timings: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Train on ``batches.get(step, micro)`` at learning rate ``lr`` (the schedule's, which
        ``lmtrain.schedule.lr_at`` gives); return the mean loss, the gradient norm, and whether
        the update was applied."""
        tc = self.tc
        clock = _Clock(self.device, timings)
        set_lr(self.optimizer, lr)
        total = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            clock.start()
            x, y, *layout = batches.get(step, micro)  # chat batches add their attention layout
            layout = layout[0] if layout else None
            clock.stop("data")
            last = micro == tc.grad_accum - 1
            # DDP: synchronise gradients on the last micro-step only. FSDP reduce-scatters every
            # micro-step: skipping it would hold whole (unsharded) gradients, what FSDP is there to avoid.
            ddp = self.info.enabled and not self.sharded
            sync = self.forward_model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                if self.cuda_graphs:
                    # Each micro-step is a new replay; earlier outputs are consumed by now.
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast(self.device, self.amp_dtype):
                    if self.teacher is None:
                        _, loss = self.forward_model(x, y, loss_fn=self.loss_fn,
                                                     **({"layout": layout} if layout is not None else {}))
                    else:
                        loss = self._distillation_loss(x, y, layout)
                self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.detach() / tc.grad_accum
            clock.stop("forward_backward")
        clock.start()
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.sharded:
            norm = norm.full_tensor()  # the norm over every rank's shard, replicated
        good = self._apply(total, norm)
        clock.stop("optimizer")
        return total, norm, good

    def _distillation_loss(self, x: torch.Tensor, y: torch.Tensor, layout=None) -> torch.Tensor:
        """``train.distill_from``: the data's CE mixed with the KL to the teacher (lmtrain.distill)."""
        from lmtrain.distill import distillation_loss

        if layout is None:
            logits, _ = self.forward_model(x)
            teacher = self.teacher.logits(x)
        else:
            logits, _ = self.forward_model(x, layout=layout)
            teacher = self.teacher.logits(x, layout)
        return distillation_loss(logits, teacher, y, self.tc.distill_alpha, self.tc.distill_temperature)

    def _apply(self, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """Apply the update unless the loss or gradient is non-finite (one host sync a step)."""
        if self.precision == "fp16":
            # The scaler skips steps with inf/nan gradients on its own (and lowers its scale);
            # only a non-finite loss counts as a bad step.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            good = bool(torch.isfinite(loss))
            if self.info.enabled:
                good = not dist_util.any_rank(not good, self.info, self.device)
        else:
            good = bool(torch.isfinite(norm) & torch.isfinite(loss))
            if self.info.enabled:
                good = not dist_util.any_rank(not good, self.info, self.device)
            if good:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return good


class _Clock:
    """Accumulates wall time per phase into ``timings`` (a no-op when it is None)."""

    def __init__(self, device: torch.device, timings: dict | None) -> None:
        self.device, self.timings = device, timings
        self.t = 0.0

    def start(self) -> None:
        if self.timings is not None:
            synchronize(self.device)
            self.t = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.timings is not None:
            synchronize(self.device)
            now = time.perf_counter()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.t
            self.t = now
