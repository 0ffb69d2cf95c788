"""What training reports, and where: the progress bar, ``train.log``, TensorBoard, MFU, the history.

``TrainLog`` is opened for the length of a training run. The loop hands it each step's loss and
gradient norm (``step``), each evaluation (``eval``) and each text sample (``text``); it decides
when a log line is due (``train.log_every``), averages the loss over the steps since the last one,
computes tokens/s and MFU, and writes to the console, the file and TensorBoard. Only rank 0
writes; every rank keeps the history (the loss is averaged across ranks first).

To add a logger (Weights & Biases, say), add it here: the loop does not change.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from lmtrain import distributed as dist_util
from lmtrain.config import Config
from lmtrain.device import memory_mb, peak_tflops
from lmtrain.lora import training_flops_per_token
from lmtrain.step import tokens_per_step

EPOCH_WARNING = 4.0  # epochs past which the start of a run warns that it repeats its data

log = logging.getLogger("lmtrain.train")
STEP_LOG = logging.getLogger("lmtrain.steps")  # per-step lines: to train.log only


class _LogFile(logging.FileHandler):
    """``train.log``. A write that fails (a full disk) is reported once, in one line, instead of
    logging's traceback per record: training goes on to its next checkpoint, which says whether
    the disk let it be written."""

    warned = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.warned:
            self.warned = True
            sys.stderr.write(f"warning: cannot write {self.baseFilename} ({sys.exc_info()[1]}); "
                             "training goes on\n")


class TrainLog:
    def __init__(self, config: Config, run_dir: Path, model, device: torch.device,
                 info: dist_util.DistInfo, start_step: int, max_steps: int) -> None:
        self.config, self.tc, self.run_dir = config, config.train, run_dir
        self.device, self.info, self.start_step, self.max_steps = device, info, start_step, max_steps
        self.tokens_per_step = tokens_per_step(config, info.world_size)
        self.flops_per_token = training_flops_per_token(model)
        self.peak = peak_tflops(device, self.tc.peak_tflops)
        self.history: list[dict[str, float]] = []
        self.writer = None
        self._handler: logging.Handler | None = None
        self._bar = None
        self._redirect = None
        self._window_loss = torch.zeros((), device=device)
        self._window_steps = self._window_tokens = 0
        self._window_start = time.perf_counter()
        self.epoch_tokens: int | None = None  # one pass over the training data (the batch source's)

    # -- lifetime ------------------------------------------------------------------------------

    def __enter__(self) -> "TrainLog":
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        if self.info.is_main:
            self._open_file_log()
            self._open_tensorboard()
        self._bar = tqdm(total=self.max_steps, initial=self.start_step, desc="train", unit="step",
                         disable=not self.info.is_main, dynamic_ncols=True, leave=False)
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Closing flushes the event file and the log; on a full disk that fails too, and must not
        # mask the error already on its way (the one that names the checkpoint and what is intact).
        closes = [lambda: self._redirect.__exit__(exc_type, exc, tb), self._bar.close]
        if self.writer is not None:
            closes.append(self.writer.close)
        if self._handler is not None:
            closes += [lambda: logging.getLogger("lmtrain").removeHandler(self._handler),
                       lambda: STEP_LOG.removeHandler(self._handler), self._handler.close]
        self.writer = None
        for close in closes:
            try:
                close()
            except Exception:
                if exc_type is None:
                    raise

    def _open_file_log(self) -> None:
        handler = _LogFile(self.run_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("lmtrain").addHandler(handler)
        # Per-step lines go to the file only: on the console the progress bar shows them.
        STEP_LOG.propagate = False
        STEP_LOG.setLevel(logging.INFO)
        STEP_LOG.addHandler(handler)
        if logging.getLogger("lmtrain").getEffectiveLevel() > logging.INFO:
            logging.getLogger("lmtrain").setLevel(logging.INFO)
        self._handler = handler

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from lmtrain.rundir import tb_dir

        # purge_step drops events a crashed run logged past the checkpoint we resume from,
        # so resumed curves continue without duplicate points.
        start = self.start_step
        self.writer = SummaryWriter(str(tb_dir(self.run_dir)), purge_step=start + 1 if start > 0 else None)
        if start == 0:
            self._log_hparams()

    def _log_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = {f"{section}.{key}": value for section, values in self.config.to_dict().items()
                if section in ("model", "train", "tokenizer") for key, value in values.items()
                if isinstance(value, (int, float, str, bool))}
        exp, ssi, sei = hparams(flat, {"val/loss": float("nan"), "val/bpb": float("nan")})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "    " + self.config.to_yaml().replace("\n", "\n    "), 0)

    # -- what the loop reports -------------------------------------------------------------------

    def announce(self, model, precision: str, resumed_from: str | None) -> None:
        if not self.info.is_main:
            return
        tc, info = self.tc, self.info
        what = f"resuming from {resumed_from} at step {self.start_step}" if resumed_from else "starting"
        log.info("train: %s; model %.2fM parameters (%.2fM without embeddings); device %s, %s%s",
                 what, model.num_params() / 1e6, model.num_params(embeddings=False) / 1e6, self.device,
                 precision, f", {info.world_size} processes" if info.enabled else "")
        log.info("global batch: %d x %d grad_accum x %d processes = %d sequences, %d tokens per step",
                 tc.batch_size, tc.grad_accum, info.world_size, tc.batch_size * tc.grad_accum * info.world_size,
                 self.tokens_per_step)

    def epochs(self, step: int) -> float | None:
        """Passes over the training data by the end of ``step``."""
        return step * self.tokens_per_step / self.epoch_tokens if self.epoch_tokens else None

    def announce_epochs(self, max_steps: int) -> None:
        """How often the run will see its data: a small corpus seen many times overfits."""
        epochs = self.epochs(max_steps)
        if epochs is None or not self.info.is_main:
            return
        log.info("data: %s training tokens; %d steps of %s tokens see them %.2f times (epochs)",
                 _count(self.epoch_tokens), max_steps, _count(self.tokens_per_step), epochs)
        if epochs > EPOCH_WARNING:
            log.warning("the run repeats its training data %.1f times: past a few epochs a model memorises "
                        "rather than learns; the best checkpoint (by val loss) is what sample, eval and export "
                        "read, train.early_stop ends the run when val stops improving, and more data or a "
                        "shorter run does better", epochs)

    def set_total(self, max_steps: int) -> None:
        """The run's last step moved (``train.max_minutes`` decided or re-planned it)."""
        self.max_steps = max_steps
        self._bar.total = max_steps
        self._bar.refresh()

    def step(self, step: int, loss: torch.Tensor, norm: torch.Tensor, lr: float) -> None:
        """Step ``step`` (1-based) is done, at learning rate ``lr``; log the window since the last
        line when one is due."""
        self._window_loss += loss.detach()
        self._window_steps += 1
        self._window_tokens += self.tokens_per_step
        self._bar.update(1)
        if step % self.tc.log_every == 0 or step == self.max_steps:
            elapsed = time.perf_counter() - self._window_start
            self._log_train(step, self._window_loss / self._window_steps, norm, lr, self._window_tokens / elapsed)
            self._window_loss = torch.zeros((), device=self.device)
            self._window_steps = self._window_tokens = 0
            self._window_start = time.perf_counter()

    def _log_train(self, step: int, loss: torch.Tensor, norm: torch.Tensor, lr: float, tokens_per_sec: float) -> None:
        loss = dist_util.all_reduce_mean(loss, self.info)
        loss_value, norm_value = loss.item(), float(norm)
        self.history.append({"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value})
        if not self.info.is_main:
            return
        mfu = None
        if self.peak:
            mfu = self.flops_per_token * tokens_per_sec / (self.peak * 1e12 * self.info.world_size)
        self._bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        log.debug("step %d: loss %.4f lr %.3e grad_norm %.3f tok/s %.0f", step, loss_value, lr, norm_value,
                  tokens_per_sec)
        epochs = self.epochs(step)
        STEP_LOG.info("step %d: loss %.4f, lr %.3e, grad_norm %.3f, %.0f tok/s%s%s", step, loss_value, lr,
                      norm_value, tokens_per_sec, f", mfu {mfu:.1%}" if mfu is not None else "",
                      f", epoch {epochs:.2f}" if epochs is not None else "")
        scalars = {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": norm_value,
                   "train/tokens_per_sec": tokens_per_sec, "train/memory_mb": memory_mb(self.device)}
        if epochs is not None:
            scalars["train/epochs"] = epochs
        if mfu is not None:
            scalars["train/mfu"] = mfu
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def eval(self, step: int, val: dict[str, float]) -> None:
        """``val`` holds val_loss, val_ppl and val_bpb."""
        self.history.append({"step": step, **val})
        if not self.info.is_main:
            return
        log.info("step %d: val loss %.4f, ppl %.2f, bpb %.4f", step, val["val_loss"], val["val_ppl"], val["val_bpb"])
        for key, value in val.items():
            self.writer.add_scalar(key.replace("val_", "val/"), value, step)

    def task(self, step: int, score) -> None:
        """``score``: a ``lmtrain.tasks.TaskScore``, logged as tasks/<name>/<metric>."""
        from lmtrain.tasks import METRICS

        metrics = {f"tasks/{score.name}/{m}": getattr(score, m) for m in METRICS}
        self.history.append({"step": step, **metrics})
        if not self.info.is_main:
            return
        log.info("step %d: task %s: acc %.4f, acc_norm %.4f, acc_norm_tokens %.4f (%d items, chance %.4f%s)",
                 step, score.name, score.acc, score.acc_norm, score.acc_norm_tokens, score.items, score.chance,
                 f", {score.truncated} cut to fit" if score.truncated else "")
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            # Markdown: indent by four spaces so code keeps its layout.
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e4 else f"{n:,}"
