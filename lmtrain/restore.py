"""How weights come back: resuming a run, starting from a pretrained source, merging LoRA.

checkpoint.py knows the files (weights, optimiser state, pointers) and nothing of what they are
for. The decisions live here, above it:

- ``Resume``: a checkpoint of this run, checked against the config (model shape, tokenizer,
  data, optimiser, LoRA shape) and loaded into the model, the optimiser and the RNG.
- ``Pretrained``: ``model.init_from``'s weights (an lmtrain checkpoint or a Hugging Face
  directory, ``lmtrain.pretrained.Source``) loaded into a fresh model; the optimiser starts fresh.
- ``load_model_weights``: what a checkpoint computes, for inference and for another run's source:
  its weights, or a LoRA checkpoint's base with the adapters merged in (``load_merged``).

``step.build_training`` takes a ``Resume`` or a ``Pretrained`` as ``restore`` (both have
``weights(model)`` and ``optimizer(optimizer, scaler)``), and a ``Pretrained`` as a LoRA run's base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain.checkpoint import (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, LoadedCheckpoint,
                                load_checkpoint, load_optimizer_state, load_weights_into, model_config_diffs,
                                read_weights, set_rng_state)
from lmtrain.errors import CheckpointError, ConfigError, first_line
from lmtrain.gguf_format import read_tensors
from lmtrain.hf_format import from_hf
from lmtrain.lora import (LoraRecord, LoraSpec, add_adapters, check_same_base, fingerprint, is_lora_checkpoint,
                          load_trainable, merge_adapters, record_of)
from lmtrain.pretrained import Source, open_source
from lmtrain.fsdp import shard_loaded_state


def load_model_weights(model: torch.nn.Module, loaded: "LoadedCheckpoint") -> None:
    """Fill ``model`` (a fresh GPT of the checkpoint's shape) with what the checkpoint computes:
    its weights, or for a LoRA run's checkpoint its base with the adapters merged in."""
    if is_lora_checkpoint(loaded.state):
        load_merged(model, loaded)
    else:
        load_weights_into(model, loaded.tensors, loaded.path / MODEL_FILE)


@dataclass
class Resume:
    """A checkpoint to resume from, read and checked: ``build_training`` loads it into the model,
    the optimiser and the scaler; ``restore_rng`` puts the random number generators back."""

    checkpoint: LoadedCheckpoint
    optimizer_state: dict

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def state(self) -> dict[str, Any]:
        return self.checkpoint.state

    @classmethod
    def load(cls, path: Path, model_config: dict[str, Any], tokenizer_sha256: str, config) -> "Resume":
        """Read ``path`` and refuse it, naming what differs, if it does not fit this run."""
        loaded = load_checkpoint(path)
        check_resumable(loaded, model_config, tokenizer_sha256, config)
        return cls(loaded, load_optimizer_state(path))

    def weights(self, model: torch.nn.Module) -> None:
        """The checkpoint's weights into ``model``; a LoRA run's ``model`` already holds its base and
        adapters (``lora.adapt``), and the checkpoint's adapters go into those."""
        current = record_of(model)
        if current is None:
            load_weights_into(model, self.checkpoint.tensors, self.path / MODEL_FILE)
            return
        check_same_base(LoraRecord.from_state(self.state, self.path / STATE_FILE), current, self.path)
        load_trainable(model, self.checkpoint.tensors, self.path / MODEL_FILE)

    def optimizer(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        try:
            optimizer.load_state_dict(self.optimizer_state["optimizer"])
            scaler.load_state_dict(self.optimizer_state["scaler"])
            shard_loaded_state(optimizer)  # a no-op unless the model is sharded (FSDP)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{self.path / OPTIMIZER_FILE} does not fit this optimiser ({exc})") from None

    def restore_rng(self) -> None:
        try:
            set_rng_state(self.state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path / STATE_FILE}: unreadable rng state ({first_line(exc)}); "
                                  "the checkpoint is corrupt") from None


def check_resumable(loaded: LoadedCheckpoint, model_config: dict[str, Any], tokenizer_sha256: str,
                    config) -> None:
    """Refuse to resume from a checkpoint of another model shape, tokenizer or corpus, naming what
    differs (``config`` is the run's ``Config``)."""
    have = loaded.model_config
    diffs = model_config_diffs(have, {k: v for k, v in model_config.items() if k != "vocab_size"})
    diffs += data_differences(loaded.state.get("config"), config)
    if have.get("vocab_size") != model_config["vocab_size"]:
        diffs.append(f"vocab size: checkpoint {have.get('vocab_size')}, tokenizer {model_config['vocab_size']}")
    if loaded.state.get("tokenizer_sha256") not in (None, tokenizer_sha256):
        diffs.append("the tokenizer changed since the checkpoint was written")
    saved_train = (loaded.state.get("config") or {}).get("train") or {}
    was = saved_train.get("optimizer", "adamw") if isinstance(saved_train, dict) else "adamw"
    if was != config.train.optimizer:
        raise CheckpointError(
            f"cannot resume from {loaded.path}: it was trained with train.optimizer {was}, and {was}'s state "
            f"cannot continue as {config.train.optimizer}'s. Keep train.optimizer {was}, or start a new "
            f"run from these weights with a fresh optimiser: model.init_from={loaded.path} (or --restart)")
    diffs += _lora_differences(loaded, config)
    if diffs:
        raise CheckpointError(f"cannot resume from {loaded.path}: {'; '.join(diffs)}; "
                              "use --restart to start over (old checkpoints are kept aside)")


def _lora_differences(loaded: LoadedCheckpoint, config) -> list[str]:
    """What keeps a checkpoint from resuming under this config's ``train.lora_*``: adapters where
    the config trains the whole model, or the other way round (refused outright), or adapters of
    another shape (listed)."""
    wanted = LoraSpec.of(config.train)
    if not is_lora_checkpoint(loaded.state):
        if wanted is not None:
            raise CheckpointError(
                f"cannot resume from {loaded.path}: it holds the whole model's weights, and the config trains LoRA "
                f"adapters (train.lora_rank {wanted.rank}); use --restart (the old checkpoints are kept aside), or "
                f"another run.dir with model.init_from={loaded.path}")
        return []
    saved = LoraRecord.from_state(loaded.state, loaded.path / STATE_FILE)
    if wanted is None:
        raise CheckpointError(
            f"cannot resume from {loaded.path}: it holds LoRA adapters (train.lora_rank {saved.spec.rank}), and the "
            f"config trains every weight (train.lora_rank 0); keep train.lora_rank {saved.spec.rank}, or start a new "
            f"run from the merged weights with model.init_from={loaded.path}")
    return saved.spec.differences(wanted)


def data_differences(checkpoint_config: dict, config) -> list[str]:
    """The ``data.*`` settings a checkpoint was trained with that this config changes."""
    saved = checkpoint_config.get("data") if isinstance(checkpoint_config, dict) else None
    if not isinstance(saved, dict):
        return []
    return [f"data.{key}: checkpoint {saved[key]!r}, config {value!r}"
            for key, value in asdict(config.data).items() if key in saved and saved[key] != value]


def load_merged(model: torch.nn.Module, loaded: LoadedCheckpoint) -> None:
    """Fill ``model`` (a fresh GPT of the checkpoint's shape) from a LoRA checkpoint (a
    ``checkpoint.LoadedCheckpoint``): the recorded base, checked, plus the adapters, merged."""
    record = LoraRecord.from_state(loaded.state, loaded.path)
    try:
        source = open_source(record.base_path(loaded.path.parent.parent), f"the base of the LoRA adapters in {loaded.path}")
    except ConfigError as exc:
        raise CheckpointError(f"{exc} (it was model.init_from {record.init_from})") from None
    Pretrained(source).weights(model)
    found = fingerprint(model)
    if found != record.base_fingerprint:
        raise CheckpointError(f"{loaded.path}: its adapters were trained on other weights than {record.base} holds "
                              f"now (fingerprint {record.base_fingerprint[:12]}, found {found[:12]}); adapters fit "
                              "only their own base")
    add_adapters(model, record.spec)
    load_trainable(model, loaded.tensors, loaded.path / "model.safetensors")
    merge_adapters(model)
    model.requires_grad_(True)


class Pretrained:
    """The source's weights, for ``step.build_training`` (in place of a ``checkpoint.Resume``):
    loaded into the freshly initialised model, the vocabulary rows beyond the source's left as
    initialised (they are padding, never used); the optimiser starts fresh."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def weights(self, model: torch.nn.Module) -> None:
        if self.source.kind == "lmtrain":  # (a LoRA run's checkpoint: its base with the adapters merged)
            load_model_weights(model, load_checkpoint(self.source.path))
            return
        tensors: dict[str, torch.Tensor] = {}
        if self.source.kind == "gguf":
            try:
                tensors = read_tensors(self.source.path, model.config)  # dequantized, in HF's layout
            except ValueError as exc:
                raise CheckpointError(f"{self.source.path}: {first_line(exc)}") from None
            except KeyError as exc:
                raise CheckpointError(f"{self.source.path}: the GGUF file lacks the tensor {exc.args[0]}") from None
        for file in self.source.weights if self.source.kind == "hf" else []:
            tensors.update(read_weights(file)[0])  # a CheckpointError naming the file if unreadable
        try:
            state = from_hf(tensors, model.config)
        except KeyError as exc:
            raise CheckpointError(f"{self.source.path}: the weights lack {exc.args[0]} "
                                  "(do they match config.json?)") from None
        full = model.state_dict()
        for key, value in state.items():
            target = full.get(key)
            if target is None or (key not in ("wte.weight", "lm_head.weight") and value.shape != target.shape) \
                    or value.shape[1:] != target.shape[1:] or value.shape[0] > target.shape[0]:
                raise CheckpointError(f"{self.source.path}: {key} has shape {tuple(value.shape)}, the model "
                                      f"expects {tuple(target.shape) if target is not None else 'no such tensor'}")
        with torch.no_grad():
            for key, value in state.items():
                full[key][: value.shape[0]].copy_(value)  # the padded vocabulary rows stay initialised

    def optimizer(self, optimizer, scaler) -> None:
        """Fine-tuning starts a fresh optimiser: nothing to load."""
