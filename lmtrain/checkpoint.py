"""Checkpoints: save, find, load and prune, so that training can stop and resume at any moment.

    RUN_DIR/checkpoints/step-00001000/
        model.safetensors   the weights; the model config in its metadata
        optimizer.pt        optimiser and grad-scaler state (tensors and plain containers only)
        state.json          step, tokens seen, val losses, the config, RNG states
    RUN_DIR/checkpoints/latest   a text file naming the newest complete checkpoint
    RUN_DIR/checkpoints/best     ... and the one with the lowest val loss

A checkpoint is filled in a temporary directory and renamed into place; only then are ``latest``
and ``best`` replaced (atomically). So they never name an incomplete checkpoint, and a crash at
any moment leaves the previous good one in place. Nothing here unpickles arbitrary objects:
weights are safetensors, ``optimizer.pt`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain import distributed as dist_util
from lmtrain.errors import CheckpointError, first_line, quoted
from lmtrain.fsutil import (atomic_dir, atomic_write_text, default_file_mode, describe_os_error, read_json,
                            remove_stale_tmp)

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)
POINTERS = ("latest", "best")
STATE_LIMIT = 16 << 20  # bytes: a state.json is kilobytes; a larger one is not ours
_NAME = re.compile(r"^step-\d{8}$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# --------------------------------------------------------------------------------------------
# RNG state in a safe (JSON) form
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"torch": _encode(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [_decode(s) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def weights_for_saving(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """A model's state dict as stored: a ``tied`` LM head once (safetensors refuses shared tensors)."""
    return {k: v.detach().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}


def save_weights(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(path), metadata=metadata)
    os.chmod(path, default_file_mode())  # safetensors creates files 0600; the rest follow the umask


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; ``CheckpointError`` if it is not one."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every malformation
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)}); "
                              "the checkpoint is corrupt") from None
    return tensors, metadata


def load_weights_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    if getattr(model.config, "tie_embeddings", False):
        tensors = dict(tensors)
        tensors.pop("lm_head.weight", None)
        tensors["lm_head.weight"] = tensors.get("wte.weight")
    check_tensors_fit(tensors, model.state_dict(), path)
    model.load_state_dict(tensors)


def check_tensors_fit(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path,
                      what: str = "weights", holder: str = "the model") -> None:
    """``CheckpointError`` naming the first problem unless ``tensors`` has exactly ``expected``'s
    names and shapes (``what``: what the file holds; ``holder``: what expects them)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: {what} do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, {holder} "
                                  f"expects {tuple(expected[key].shape)}")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


@dataclass
class SavedCheckpoint:
    path: Path
    is_best: bool


def save_checkpoint(directory: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict[str, Any], keep: int) -> SavedCheckpoint:
    """Write ``step-XXXXXXXX/`` atomically, then move ``latest`` (and ``best``) to it, then prune.

    ``weights`` is the model's whole state dict; ``state`` must hold ``model_config`` and
    ``val_loss`` (the loss measured at this step, or None): ``best`` moves when it is lower than
    the val loss of the checkpoint ``best`` names now.
    """
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(directory)
    name = checkpoint_name(step)
    final = directory / name
    if final.exists():  # a rerun of the same step (resumed after a crash past it): replace
        shutil.rmtree(final)
    # A LoRA run's weights file holds its adapters only; the base is read from state["lora"]["base"].
    metadata = {"model_config": json.dumps(state["model_config"]), "step": str(step),
                "format": "lmtrain-lora-1" if state.get("lora") else "lmtrain-checkpoint-1"}
    previous = _pointer_name(directory, "latest") or "none"
    try:
        with atomic_dir(final) as tmp:
            tied = bool(state["model_config"].get("tie_embeddings", False))
            save_weights(weights_for_saving(weights, tied), tmp / MODEL_FILE, metadata)
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        atomic_write_text(directory / "latest", name + "\n")
    except Exception as exc:
        # safetensors and torch.save report a full disk as their own errors (SafetensorError,
        # RuntimeError "unexpected pos ..."), not as OSError.
        if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
            raise
        reason = describe_os_error(exc) if isinstance(exc, OSError) else first_line(exc)
        raise CheckpointError(
            f"could not write checkpoint {final}: {reason}; the previous checkpoint ({previous}) is "
            "intact and `lmtrain train` resumes from it") from None
    is_best = False
    val_loss = state.get("val_loss")
    if val_loss is not None:
        best_loss = _pointer_val_loss(directory, "best")
        if best_loss is None or val_loss <= best_loss:
            try:
                atomic_write_text(directory / "best", name + "\n")
            except OSError as exc:
                raise CheckpointError(f"wrote checkpoint {final} but could not update {directory / 'best'}: "
                                      f"{describe_os_error(exc)}; `latest` names the new checkpoint") from None
            is_best = True
    prune_checkpoints(directory, keep)
    return SavedCheckpoint(final, is_best)


def _pointer_name(directory: Path, pointer: str) -> str | None:
    try:
        return resolve_checkpoint(directory, pointer).name
    except CheckpointError:
        return None


def _pointer_val_loss(directory: Path, pointer: str) -> float | None:
    try:
        state = read_json(resolve_checkpoint(directory, pointer) / STATE_FILE)
        return state.get("val_loss") if isinstance(state, dict) else None
    except (CheckpointError, OSError, ValueError):
        return None


def prune_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints, never the ones a pointer names."""
    protected = set()
    for pointer in POINTERS:
        try:
            protected.add(resolve_checkpoint(directory, pointer).name)
        except CheckpointError:
            pass
    steps = sorted(p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name))
    removed = []
    for path in steps[:-keep] if keep > 0 else steps:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Finding and loading
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(directory: Path, name: str) -> Path:
    """``latest``, ``best`` or ``step-XXXXXXXX`` -> that checkpoint's directory, inside ``directory``.

    Names read from the pointer files are checked: a pointer that leads outside the checkpoints
    directory (``..``, an absolute path, a symlink out) is refused.
    """
    if name == "best" and not (directory / "best").is_file() and (directory / "latest").is_file():
        name = "latest"  # a run with no evaluation yet: its latest is all there is
    if name in POINTERS:
        pointer = directory / name
        if not pointer.is_file():
            raise CheckpointError(f"no checkpoint: {pointer} does not exist; train first")
        target = _read_pointer(pointer)
        if target is None or not _NAME.match(target):
            raise CheckpointError(f"{pointer} names {quoted(target)}, which is not a checkpoint directory "
                                  "name (step-XXXXXXXX); refusing it")
        name = target
    elif not _NAME.match(name):
        raise CheckpointError(f"unknown checkpoint {name!r}: use latest, best or a step-XXXXXXXX directory")
    path = directory / name
    if path.is_symlink() or not path.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"{path} points outside {directory}; refusing it")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def newest_complete_checkpoint(directory: Path) -> Path | None:
    """The newest ``step-XXXXXXXX`` whose files are all there and readable, or None."""
    for name in reversed(list_checkpoints(directory)):
        path = directory / name
        if path.is_symlink() or not (path / OPTIMIZER_FILE).is_file():
            continue
        try:
            load_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def _complete_state(path: Path) -> dict | None:
    """A checkpoint directory's state if all its files are there and state.json reads (cheap:
    the weights are not loaded), else None."""
    if path.is_symlink() or not all((path / f).is_file() for f in CHECKPOINT_FILES):
        return None
    try:
        state = read_json(path / STATE_FILE)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _read_pointer(pointer: Path) -> str | None:
    """What a pointer file names (stripped; its first 64 bytes: a name is 13), or None when there
    is no such file. A pointer that is a symbolic link is refused: it could name anything."""
    if pointer.is_symlink():
        raise CheckpointError(f"{pointer} is a symbolic link; a pointer must be a plain file, refusing it")
    try:
        with open(pointer, "rb") as f:
            return f.read(64).decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read {pointer}: {describe_os_error(exc)}") from None


def list_checkpoints(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name))


def model_config_diffs(checkpoint_config: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``model.KEY: checkpoint A, config B`` for every model key the two disagree on. A key the
    checkpoint predates counts as its default (the architecture it was trained with)."""
    from lmtrain.config import ArchitectureConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ArchitectureConfig)}
    diffs = []
    for key, value in wanted.items():
        have = checkpoint_config.get(key, defaults.get(key, value))
        if have != value:
            diffs.append(f"model.{key}: checkpoint {have!r}, config {value!r}")
    return diffs


@dataclass
class LoadedCheckpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    state: dict[str, Any]

    @property
    def model_config(self) -> dict[str, Any]:
        return self.state["model_config"]


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read weights and state of one checkpoint directory, checking that it is whole."""
    state = read_state(path)
    tensors, metadata = read_weights(path / MODEL_FILE)
    return LoadedCheckpoint(path, tensors, metadata, state)


def read_state(path: Path) -> dict[str, Any]:
    """One checkpoint's ``state.json`` (step, model config, the config, ...), checked, without
    reading its weights; the checkpoint must be whole."""
    for file in (MODEL_FILE, STATE_FILE):
        if not (path / file).is_file():
            raise CheckpointError(f"{path / file} is missing; the checkpoint is incomplete")
    try:
        state = read_json(path / STATE_FILE, STATE_LIMIT)
    except ValueError as exc:
        raise CheckpointError(f"{path / STATE_FILE} is not valid JSON ({first_line(exc, 80)}); the checkpoint is "
                              "corrupt") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {describe_os_error(exc)}") from None
    if not isinstance(state, dict) or "step" not in state or "model_config" not in state:
        raise CheckpointError(f"{path / STATE_FILE} lacks step or model_config; the checkpoint is corrupt")
    if (not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0
            or not isinstance(state["model_config"], dict)):
        raise CheckpointError(f"{path / STATE_FILE}: step or model_config has the wrong type; the checkpoint "
                              "is corrupt")
    return state


def load_optimizer_state(path: Path) -> dict:
    """``optimizer.pt`` through ``torch.load(weights_only=True)``: tensors and containers only."""
    file = path / OPTIMIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint cannot resume training")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors; others for truncation
        raise CheckpointError(f"{file} was refused or is corrupt ({first_line(exc)}); lmtrain only "
                              "loads tensors and plain containers from it") from None


# --------------------------------------------------------------------------------------------
# During training: when to save, saving, and resuming
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Owns ``RUN_DIR/checkpoints`` for a training run: whether a save is due, the save itself
    (rank 0 writes; every rank first checks that the replicas agree), pruning and the pointers."""

    def __init__(self, directory: Path, every: int, keep: int, info: dist_util.DistInfo,
                 device: torch.device) -> None:
        self.directory, self.every, self.keep = directory, every, keep
        self.info, self.device = info, device
        self.last: Path | None = None  # the checkpoint this run wrote last

    def due(self, step: int, final: bool) -> bool:
        """Every ``train.checkpoint_every`` steps, and at the end (done, out of time, or stopped)."""
        return step % self.every == 0 or final

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the one ``latest`` names, or None when the run has none.

        A ``latest`` that is missing, empty or names a checkpoint that is gone, beside checkpoints
        that exist, is not a reason to start over (and overwrite them): training resumes from the
        newest complete checkpoint instead, and says so.
        """
        pointer = self.directory / "latest"
        target = _read_pointer(pointer)
        gone = target is not None and (target == "" or (
            _NAME.match(target) is not None and not (self.directory / target).exists()
            and not (self.directory / target).is_symlink()))
        if target is not None and not gone:
            return resolve_checkpoint(self.directory, "latest")  # or its own refusal of what it names
        if not list_checkpoints(self.directory):
            if target is not None:
                return resolve_checkpoint(self.directory, "latest")  # names a checkpoint that is gone
            return None  # a new run
        what = f"{pointer} is missing" if target is None else f"{pointer} names {target or 'nothing'}, which is gone"
        recovered = newest_complete_checkpoint(self.directory)
        if recovered is None:
            raise CheckpointError(f"{what}, and none of the checkpoints in {self.directory} is complete: "
                                  "nothing to resume from; use --restart to start over (they are kept aside)")
        log.warning("%s; resuming from the newest complete checkpoint, %s", what, recovered.name)
        return recovered

    def repair_best(self) -> None:
        """Re-point a ``best`` that names a checkpoint that is gone or incomplete at the complete
        checkpoint with the lowest val loss (or remove it when there is none), and say so."""
        pointer = self.directory / "best"
        target = _read_pointer(pointer)
        if target is None or (_NAME.match(target) and _complete_state(self.directory / target) is not None):
            return  # no best yet, or a good one (an unsafe name is refused by whoever reads it)
        candidates = []
        for name in list_checkpoints(self.directory):
            state = _complete_state(self.directory / name)
            if state is not None and isinstance(state.get("val_loss"), (int, float)):
                candidates.append((state["val_loss"], name))
        problem = f"{pointer} names {target or 'nothing'}, which is gone or incomplete"
        if candidates:
            atomic_write_text(pointer, min(candidates)[1] + "\n")
            log.warning("%s: it now names %s, the best complete checkpoint", problem, min(candidates)[1])
        else:
            pointer.unlink()
            log.warning("%s: removed it; the next checkpoint sets it", problem)

    def save(self, step: int, training, state: dict[str, Any]) -> Path:
        """Write ``step-XXXXXXXX`` of ``training`` (a ``step.Training``); every rank calls this.

        Before saving, the ranks check that they agree: under DDP their weights must be identical;
        under FSDP, where each holds different shards, their optimiser step counts and buffers.
        """
        if self.info.enabled:
            what = dist_util.check_ranks_agree(training.model, training.optimizer, self.info, self.device)
            if self.info.is_main:
                log.info("step %d: all %d %s", step, self.info.world_size, what)
        weights, optimizer_state = training.snapshot(keep=self.info.is_main)
        if self.info.is_main:
            saved = save_checkpoint(self.directory, step, weights, optimizer_state, state, self.keep)
            self.last = saved.path
            log.info("step %d: checkpoint %s%s", step, saved.path, " (best)" if saved.is_best else "")
        else:
            self.last = self.directory / checkpoint_name(step)
        dist_util.barrier(self.info)
        return self.last


