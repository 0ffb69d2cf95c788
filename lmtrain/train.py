"""The training loop: data, model, AdamW, schedule, mixed precision, eval, checkpoints, logging.

``train(config)`` trains the GPT of ``config.model`` on the shards of ``RUN_DIR/data``. If the run
has a checkpoint it resumes from ``latest``; because batches are a pure function of the step and
every piece of state (weights, optimiser, grad scaler, RNG) is checkpointed, a resumed run
computes exactly what an uninterrupted one would have.

Under torchrun each process trains a DistributedDataParallel replica; rank 0 alone writes
checkpoints, TensorBoard events and the log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtrain import checkpoint as ckpt
from lmtrain import distributed as dist_util
from lmtrain.config import Config, TrainConfig
from lmtrain.data import TokenWindows, TrainBatches, to_device, val_positions
from lmtrain.errors import CheckpointError, ConfigError, LmtrainError
from lmtrain.fsutil import sha256_file
from lmtrain.model import GPT, GPTConfig, amp_context
from lmtrain.rundir import checkpoints_dir, data_dir, prepare_run_dir, tb_dir, tokenizer_path
from lmtrain.shards import read_manifest

log = logging.getLogger(__name__)
STEP_LOG = logging.getLogger("lmtrain.steps")

# Dense bf16 peak TFLOP/s of common GPUs, for MFU (train.peak_tflops overrides).
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "A6000": 155.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "4090": 165.0, "3090": 71.0, "V100": 125.0, "T4": 65.0,
}


class TrainingError(LmtrainError):
    """Training cannot go on (diverged, out of memory, ...)."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted by signal {signum} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    step: int
    max_steps: int
    resumed_from: str | None
    already_done: bool = False
    stopped_by: str = "max_steps"
    val_loss: float | None = None
    val_bpb: float | None = None
    best_val_loss: float | None = None
    tokens_seen: int = 0
    seconds: float = 0.0
    tokens_per_sec: float = 0.0
    skipped_steps: int = 0
    checkpoint: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Device, precision, schedule, optimiser
# --------------------------------------------------------------------------------------------


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if setting == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: mps was asked for, but it is not available")
    return torch.device(setting)


def resolve_precision(setting: str, device: torch.device) -> str:
    if setting == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if setting == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
    return setting


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_for(device: torch.device, precision: str):
    return amp_context(device, AMP_DTYPES[precision])


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


def param_groups(model: GPT, weight_decay: float) -> list[dict[str, Any]]:
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


def build_model(config: Config, vocab_size: int) -> GPT:
    m = config.model
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                         block_size=m.block_size, dropout=m.dropout, bias=m.bias,
                         pos_embedding=m.pos_embedding, norm=m.norm, mlp=m.mlp,
                         tie_embeddings=m.tie_embeddings, rope_theta=m.rope_theta))


def device_peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, Linux KiB


def make_optimizer(model: GPT, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=device.type == "cuda")


def wrap_model(model: GPT, tc: TrainConfig, device: torch.device, info: dist_util.DistInfo) -> torch.nn.Module:
    """The module the training step calls: compiled (CUDA by default) and DDP-wrapped as needed."""
    use_compile = tc.compile == "true" or (tc.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    wrapped: torch.nn.Module = model
    if use_compile:
        wrapped = torch.compile(wrapped, mode=tc.compile_mode)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


class StepRunner:
    """One optimiser step: grad_accum micro-batches, clipping, and the update unless non-finite.

    Shared by the trainer and ``scripts/bench_train.py``, so the benchmark measures the very
    step training runs. With ``timings`` (a dict) it also splits the step's time into data,
    forward+backward and optimiser, synchronising the device at each boundary to do so.
    """

    def __init__(self, model: GPT, forward_model: torch.nn.Module, optimizer, scaler, tc: TrainConfig,
                 precision: str, device: torch.device, info: dist_util.DistInfo) -> None:
        self.model, self.forward_model, self.optimizer, self.scaler = model, forward_model, optimizer, scaler
        self.tc, self.precision, self.device, self.info = tc, precision, device, info
        self.cuda_graphs = (device.type == "cuda" and forward_model is not model
                            and tc.compile_mode in ("reduce-overhead", "max-autotune"))

    def run(self, step: int, batches, timings: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        tc = self.tc
        clock = _Clock(self.device, timings)
        lr = lr_at(step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum):
            clock.start()
            x, y = batches.get(step, micro)
            clock.stop("data")
            last = micro == tc.grad_accum - 1
            # DDP: synchronise gradients on the last micro-step only.
            sync = contextlib.nullcontext() if (last or not self.info.enabled) else self.forward_model.no_sync()
            with sync:
                if self.cuda_graphs:
                    # Each micro-step is a new replay; earlier outputs are consumed by now.
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast_for(self.device, self.precision):
                    _, loss = self.forward_model(x, y)
                self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.detach() / tc.grad_accum
            clock.stop("forward_backward")
        clock.start()
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        good = self._apply(total, norm)
        clock.stop("optimizer")
        return total, norm, good

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

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self.timings is not None:
            self._sync()
            self.t = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.timings is not None:
            self._sync()
            now = time.perf_counter()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.t
            self.t = now


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class StopSignals:
    """The first SIGINT/SIGTERM asks to stop after the current step; a second SIGINT exits now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing this step, then writing a checkpoint "
                    "(Ctrl-C again to quit at once)", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def train(config: Config, restart: bool = False) -> TrainResult:
    """Train (or resume) the run described by ``config``; see the module docstring."""
    info = dist_util.from_environment()
    check_world_size(config.train, info)
    device = resolve_device(config.train.device, info.local_rank)
    dist_util.init(info, device.type)
    try:
        return Trainer(config, info, device).run(restart)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise out_of_memory(config, exc) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            raise out_of_memory(config, exc) from None
        raise
    finally:
        dist_util.shutdown()


def check_world_size(tc: TrainConfig, info: dist_util.DistInfo) -> None:
    """Every rank must get an equal share of the validation windows (checked before joining)."""
    val_windows = tc.eval_batches * tc.batch_size
    if info.enabled and val_windows % info.world_size:
        raise ConfigError(
            f"train.eval_batches x train.batch_size = {val_windows} validation windows cannot be split "
            f"evenly over {info.world_size} processes; make it a multiple of {info.world_size}"
        )


def out_of_memory(config: Config, exc: BaseException) -> TrainingError:
    return TrainingError(
        f"out of memory with train.batch_size={config.train.batch_size}, model.block_size="
        f"{config.model.block_size}, model.n_embd={config.model.n_embd}: lower train.batch_size (and "
        "raise train.grad_accum to keep the global batch), model.block_size or the model size")


class Trainer:
    def __init__(self, config: Config, info: dist_util.DistInfo, device: torch.device) -> None:
        self.config, self.info, self.device = config, info, device
        self.tc = config.train
        self.run_dir = config.run_dir
        self.ckpt_dir = checkpoints_dir(self.run_dir)
        self.precision = resolve_precision(self.tc.precision, device)
        self.writer = None
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None

    # -- setup -----------------------------------------------------------------------------

    def run(self, restart: bool) -> TrainResult:
        # Everything is checked before anything is written: a mistake costs nothing.
        from lmtrain.rundir import check_run_dir_usable

        check_run_dir_usable(self.run_dir)
        tok_file = tokenizer_path(self.run_dir)
        if not tok_file.exists():
            raise LmtrainError(f"no tokenizer at {tok_file}; run `lmtrain tokenize` and `lmtrain shard` first")
        self.tokenizer_sha = sha256_file(tok_file)
        self.manifest = read_manifest(data_dir(self.run_dir))
        # TokenWindows (open_split) refuses shards made with another tokenizer.
        window = self.config.model.block_size + 1
        self.train_windows = TokenWindows(data_dir(self.run_dir), "train", window, self.tokenizer_sha)
        self.val_windows = TokenWindows(data_dir(self.run_dir), "val", window, self.tokenizer_sha)

        torch.manual_seed(self.config.run.seed)
        self.model = build_model(self.config, self.manifest["vocab_size"])
        self.state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "best_val_loss": None,
                                      "train_seconds": 0.0, "skipped_steps": 0,
                                      "last_val": None}
        resume = None if restart else self._find_resume_checkpoint()
        if resume is not None:
            loaded = ckpt.load_checkpoint(resume)
            self._check_compatible(loaded)
            ckpt.load_weights_into(self.model, loaded.tensors, resume / ckpt.MODEL_FILE)
            opt_state = ckpt.load_optimizer_state(resume)
            self.state.update({k: loaded.state[k] for k in self.state if k in loaded.state})
        self.model.to(self.device)

        self.optimizer = make_optimizer(self.model, self.tc, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if resume is not None:
            try:
                self.optimizer.load_state_dict(opt_state["optimizer"])
                self.scaler.load_state_dict(opt_state["scaler"])
            except (KeyError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{resume / ckpt.OPTIMIZER_FILE} does not fit this optimiser ({exc})") from None
            ckpt.set_rng_state(loaded.state["rng"])
        self.resumed_from = resume.name if resume is not None else None

        if self.info.is_main:
            prepare_run_dir(self.config)
            if restart:
                for moved in (ckpt.move_aside(self.ckpt_dir), ckpt.move_aside(tb_dir(self.run_dir))):
                    if moved is not None:
                        log.info("--restart: moved %s aside", moved)
        dist_util.barrier(self.info)

        if self._budget_spent():
            return self._result(already_done=True, stopped_by="max_minutes")
        if self.state["step"] >= self.tc.max_steps:
            return self._result(already_done=True, stopped_by="max_steps")

        self.forward_model = wrap_model(self.model, self.tc, self.device, self.info)
        self.runner = StepRunner(self.model, self.forward_model, self.optimizer, self.scaler, self.tc,
                                 self.precision, self.device, self.info)
        return self._loop()

    def _find_resume_checkpoint(self) -> Path | None:
        if not (self.ckpt_dir / "latest").exists():
            return None
        return ckpt.resolve_checkpoint(self.ckpt_dir, "latest")

    def _check_compatible(self, loaded: ckpt.LoadedCheckpoint) -> None:
        want = self.model.config.to_dict()
        have = loaded.model_config
        diffs = ckpt.model_config_diffs(have, {k: v for k, v in want.items() if k != "vocab_size"})
        if have.get("vocab_size") != want["vocab_size"]:
            diffs.append(f"vocab size: checkpoint {have.get('vocab_size')}, tokenizer {want['vocab_size']}")
        if loaded.state.get("tokenizer_sha256") not in (None, self.tokenizer_sha):
            diffs.append("the tokenizer changed since the checkpoint was written")
        if diffs:
            raise CheckpointError(f"cannot resume from {loaded.path}: {'; '.join(diffs)}; "
                                  "use --restart to start over (old checkpoints are kept aside)")

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> TrainResult:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        tc, info = self.tc, self.info
        start_step = self.state["step"]
        batches = TrainBatches(self.train_windows, self.config.run.seed, tc.batch_size, info.rank,
                               info.world_size, self.device)
        tokens_per_step = tc.batch_size * tc.grad_accum * info.world_size * self.config.model.block_size
        self.flops_per_token = self.model.flops_per_token()
        self.peak = device_peak_tflops(self.device, tc.peak_tflops)
        file_handler = self._open_logs(start_step)
        self._announce(tokens_per_step)
        bad_streak = 0
        step = start_step
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_start, window_tokens = 0, time.perf_counter(), 0
        run_start = time.perf_counter()
        seconds_before = self.state["train_seconds"]
        val = None
        stopped_by, interrupted = "max_steps", None
        bar = tqdm(total=tc.max_steps, initial=start_step, desc="train", unit="step",
                   disable=not info.is_main, dynamic_ncols=True, leave=False)
        try:
            with StopSignals() as signals, logging_redirect_tqdm():
                while step < tc.max_steps:
                    loss, norm, step_ok = self._step(step, batches)
                    if step_ok:
                        bad_streak = 0
                    else:
                        bad_streak += 1
                        self.state["skipped_steps"] += 1
                        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)",
                                    step + 1, bad_streak)
                        if bad_streak >= tc.max_bad_steps:
                            raise TrainingError(
                                f"{bad_streak} non-finite steps in a row at step {step + 1}: training "
                                "diverged. Lower train.lr, raise train.warmup_steps or use "
                                "train.precision: bf16/fp32; the last good checkpoint is untouched")
                    step += 1
                    self.state["step"] = step
                    self.state["tokens_seen"] += tokens_per_step
                    window_loss += loss.detach()
                    window_steps += 1
                    window_tokens += tokens_per_step
                    bar.update(1)

                    if step % tc.log_every == 0 or step == tc.max_steps:
                        elapsed = time.perf_counter() - window_start
                        self._log_train(step, window_loss / window_steps, norm, window_tokens / elapsed, bar)
                        window_loss = torch.zeros((), device=self.device)
                        window_steps, window_start, window_tokens = 0, time.perf_counter(), 0
                    self.state["train_seconds"] = seconds_before + time.perf_counter() - run_start
                    stop_time = self._budget_spent()
                    stop_signal = signals.signum is not None
                    if info.enabled:
                        stop_time = dist_util.any_rank(stop_time, info, self.device)
                        stop_signal = dist_util.any_rank(stop_signal, info, self.device)
                    final = step == tc.max_steps or stop_time or stop_signal
                    if step % tc.eval_every == 0 or final or step % tc.checkpoint_every == 0:
                        val = self._evaluate(step)
                    if tc.sample_every and step % tc.sample_every == 0 and info.is_main:
                        self._log_sample(step)
                    if step % tc.checkpoint_every == 0 or final:
                        self._save(step, val)  # every checkpoint step has just evaluated
                    if stop_signal:
                        interrupted = signals.signum or signal.SIGTERM
                        break
                    if stop_time:
                        stopped_by = "max_minutes"
                        log.info("train.max_minutes reached (%.1f min): stopping at step %d",
                                 self.state["train_seconds"] / 60, step)
                        break
        finally:
            bar.close()
            self._close_logs(file_handler)
        if interrupted is not None:
            raise TrainingInterrupted(interrupted, step, self.last_checkpoint)
        seconds = time.perf_counter() - run_start
        result = self._result(stopped_by=stopped_by)
        result.start_step = start_step
        result.seconds = seconds
        result.tokens_per_sec = (step - start_step) * tokens_per_step / max(seconds, 1e-9)
        return result

    def _step(self, step: int, batches: TrainBatches) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return self.runner.run(step, batches)

    def _budget_spent(self) -> bool:
        return self.tc.max_minutes is not None and self.state["train_seconds"] >= self.tc.max_minutes * 60

    # -- eval, samples, checkpoints ----------------------------------------------------------

    @torch.no_grad()
    def _evaluate(self, step: int) -> dict[str, float]:
        tc, info = self.tc, self.info
        positions = val_positions(self.val_windows, tc.eval_batches * tc.batch_size)
        mine = positions[info.rank :: info.world_size]
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for i in range(0, len(mine), tc.batch_size):
            x, y = to_device(self.val_windows.windows(mine[i : i + tc.batch_size]), self.device)
            with autocast_for(self.device, self.precision):
                _, loss = self.model(x, y)
            total += loss.float() * len(x)
            count += len(x)
        self.model.train()
        if info.enabled:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        val_loss = (total / count).item()
        split = self.manifest["splits"]["val"]
        bpb = val_loss * split["tokens"] / split["utf8_bytes"] / math.log(2)
        val = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_bpb": bpb}
        best = self.state["best_val_loss"]
        if best is None or val_loss < best:
            self.state["best_val_loss"] = val_loss
        self.state["last_val"] = {"step": step, **val}
        if info.is_main:
            log.info("step %d: val loss %.4f, ppl %.2f, bpb %.4f", step, val_loss, val["val_ppl"], bpb)
            if self.writer is not None:
                self.writer.add_scalar("val/loss", val_loss, step)
                self.writer.add_scalar("val/ppl", val["val_ppl"], step)
                self.writer.add_scalar("val/bpb", bpb, step)
        self.history.append({"step": step, **val})
        return val

    def _log_sample(self, step: int) -> None:
        from lmtrain.generate import Decoder, SamplingParams, generate
        from lmtrain.tokenizer import load_tokenizer

        if not hasattr(self, "_sample_tokenizer"):
            self._sample_tokenizer = load_tokenizer(self.run_dir)
        tokenizer = self._sample_tokenizer
        prompt_text = self.config.sample.prompt
        ids = tokenizer.encode(prompt_text, add_special_tokens=False).ids if prompt_text else [self.manifest["eot_id"]]
        prompt = torch.tensor([ids[-self.config.model.block_size:]], device=self.device)
        generator = torch.Generator().manual_seed(self.config.run.seed)
        params = SamplingParams(temperature=self.config.sample.temperature, top_k=self.config.sample.top_k)
        self.model.eval()
        amp = AMP_DTYPES[self.precision]
        # Eager decoding: 64 tokens do not repay a CUDA graph's capture and weight copy.
        decoder = Decoder(self.model, 1, amp, cuda_graph=False)
        new = [int(t) for t in generate(self.model, prompt, 64, params, generator, amp, decoder=decoder)]
        self.model.train()
        text = tokenizer.decode(ids + new, skip_special_tokens=False)
        if self.writer is not None:
            # Markdown: indent by four spaces so code keeps its layout.
            self.writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)

    def _save(self, step: int, val: dict[str, float]) -> None:
        self.last_checkpoint = None
        if self.info.enabled:
            dist_util.check_replicas_in_sync(self.model, self.info, self.device)
            if self.info.is_main:
                log.info("step %d: all %d replicas hold identical weights", step, self.info.world_size)
        if self.info.is_main:
            state = {
                **{k: v for k, v in self.state.items()},
                "val_loss": val["val_loss"],
                "model_config": self.model.config.to_dict(),
                "tokenizer_sha256": self.tokenizer_sha,
                "config": self.config.to_dict(),
                "rng": ckpt.rng_state(),
                "precision": self.precision,
            }
            optimizer_state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
            saved = ckpt.save_checkpoint(self.ckpt_dir, step, self.model, optimizer_state, state,
                                         self.tc.keep_checkpoints)
            self.last_checkpoint = saved.path
            log.info("step %d: checkpoint %s%s", step, saved.path, " (best)" if saved.is_best else "")
        else:
            self.last_checkpoint = self.ckpt_dir / ckpt.checkpoint_name(step)
        dist_util.barrier(self.info)

    # -- logging -----------------------------------------------------------------------------

    def _open_logs(self, start_step: int):
        if not self.info.is_main:
            return None
        handler = logging.FileHandler(self.run_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("lmtrain").addHandler(handler)
        # Per-step lines go to the file only: on the console the progress bar shows them.
        STEP_LOG.propagate = False
        STEP_LOG.setLevel(logging.INFO)
        STEP_LOG.addHandler(handler)
        if logging.getLogger("lmtrain").getEffectiveLevel() > logging.INFO:
            logging.getLogger("lmtrain").setLevel(logging.INFO)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run logged past the checkpoint we resume from,
        # so resumed curves continue without duplicate points.
        self.writer = SummaryWriter(str(tb_dir(self.run_dir)),
                                    purge_step=start_step + 1 if start_step > 0 else None)
        if start_step == 0:
            self._log_hparams()
        return handler

    def _log_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = {f"{section}.{key}": value for section, values in self.config.to_dict().items()
                if section in ("model", "train", "tokenizer") for key, value in values.items()
                if isinstance(value, (int, float, str, bool))}
        exp, ssi, sei = hparams(flat, {"val/loss": float("nan"), "val/bpb": float("nan")})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "    " + self.config.to_yaml().replace("\n", "\n    "), 0)

    def _close_logs(self, handler) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if handler is not None:
            logging.getLogger("lmtrain").removeHandler(handler)
            STEP_LOG.removeHandler(handler)
            handler.close()

    def _announce(self, tokens_per_step: int) -> None:
        if not self.info.is_main:
            return
        tc = self.tc
        n = self.model.num_params()
        what = f"resuming from {self.resumed_from} at step {self.state['step']}" if self.resumed_from else "starting"
        log.info("train: %s; model %.2fM parameters (%.2fM without embeddings); device %s, %s%s",
                 what, n / 1e6, self.model.num_params(embeddings=False) / 1e6, self.device, self.precision,
                 f", {self.info.world_size} processes" if self.info.enabled else "")
        log.info("global batch: %d x %d grad_accum x %d processes = %d sequences, %d tokens per step",
                 tc.batch_size, tc.grad_accum, self.info.world_size,
                 tc.batch_size * tc.grad_accum * self.info.world_size, tokens_per_step)

    def _log_train(self, step: int, loss: torch.Tensor, norm: torch.Tensor, tokens_per_sec: float, bar) -> None:
        loss = dist_util.all_reduce_mean(loss, self.info)
        loss_value, norm_value = loss.item(), float(norm)
        lr = lr_at(step - 1, self.tc)
        self.history.append({"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value})
        if not self.info.is_main:
            return
        mfu = None
        if self.peak:
            mfu = self.flops_per_token * tokens_per_sec / (self.peak * 1e12 * self.info.world_size)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        log.debug("step %d: loss %.4f lr %.3e grad_norm %.3f tok/s %.0f", step, loss_value, lr, norm_value, tokens_per_sec)
        STEP_LOG.info(
            "step %d: loss %.4f, lr %.3e, grad_norm %.3f, %.0f tok/s%s", step, loss_value, lr, norm_value,
            tokens_per_sec, f", mfu {mfu:.1%}" if mfu is not None else "")
        w = self.writer
        w.add_scalar("train/loss", loss_value, step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/grad_norm", norm_value, step)
        w.add_scalar("train/tokens_per_sec", tokens_per_sec, step)
        w.add_scalar("train/memory_mb", memory_mb(self.device), step)
        if mfu is not None:
            w.add_scalar("train/mfu", mfu, step)

    def _result(self, already_done: bool = False, stopped_by: str = "max_steps") -> TrainResult:
        last = self.state.get("last_val") or {}
        return TrainResult(
            run_dir=self.run_dir, start_step=self.state["step"], step=self.state["step"],
            max_steps=self.tc.max_steps, resumed_from=self.resumed_from, already_done=already_done,
            stopped_by=stopped_by, val_loss=last.get("val_loss"), val_bpb=last.get("val_bpb"),
            best_val_loss=self.state["best_val_loss"], tokens_seen=self.state["tokens_seen"],
            skipped_steps=self.state["skipped_steps"], checkpoint=getattr(self, "last_checkpoint", None),
            history=self.history,
        )
