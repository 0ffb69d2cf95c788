"""``model.init_from``: start a run from someone else's weights (fine-tuning).

A source is a Hugging Face model directory on disk (``config.json`` + safetensors, Llama or GPT-2
architecture: for example one ``lmtrain export`` wrote) or an lmtrain run directory or checkpoint.
Nothing is ever downloaded. From the source come:

- the architecture: ``resolve(config)`` fills the ``model`` section from it, and refuses a
  ``model.*`` key the config sets to something else (naming both values);
- the tokenizer: ``lmtrain tokenize`` copies the source's instead of training one (it must be a
  byte-level BPE), and its end-of-text token becomes ``tokenizer.special_tokens[0]``;
- the weights: ``lmtrain train`` loads them into the new model (the vocabulary padded as usual)
  and starts a fresh optimiser (``lmtrain.restore.Pretrained``). A run that has checkpoints
  resumes from them instead.

This module reads a source's configuration only, never its weights.

What lmtrain cannot compute exactly (grouped-query attention, rope scaling, other activations or
norm epsilons, other widths) is refused with one line and the reason, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtrain import checkpoint as ckpt
from lmtrain.config import ArchitectureConfig, Config
from lmtrain.errors import CheckpointError, ConfigError, first_line
from lmtrain.hf_format import model_fields_from_hf
from lmtrain.rundir import checkpoints_dir, tokenizer_path

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Source:
    """A resolved ``model.init_from``."""

    path: Path
    kind: str  # "hf" or "lmtrain"
    fields: dict[str, Any]  # architecture fields and vocab_size
    tokenizer_file: Path
    eot: str  # the source's end-of-text token
    weights: list[Path]  # safetensors files (an lmtrain checkpoint: its model.safetensors)

    def architecture(self) -> dict[str, Any]:
        return {k: v for k, v in self.fields.items() if k != "vocab_size"}


def open_source(init_from: str, key: str = "model.init_from") -> Source:
    """Read what ``model.init_from`` (or the config ``key``) names: its config only; the weights
    are read when training."""
    path = Path(init_from).expanduser()
    where = f"{key} {init_from}"
    if not path.exists():
        if HUB_NAME.match(init_from) and not init_from.startswith((".", "~")):
            raise ConfigError(f"{where}: no such directory; lmtrain downloads nothing. If it is a Hugging Face "
                              f"Hub name, download it first (`huggingface-cli download {init_from} --local-dir "
                              f"DIR`) and set {key} to DIR")
        raise ConfigError(f"{where}: no such file or directory")
    if (path / "config.json").is_file():
        return _hf_source(path, where)
    return _lmtrain_source(path, where)


def _hf_source(path: Path, where: str) -> Source:
    try:
        hf = json.loads((path / "config.json").read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: config.json is not readable JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: config.json is not a JSON object")
    fields = model_fields_from_hf(hf, where)
    weights = _safetensors_files(path, where)
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConfigError(f"{where}: no tokenizer.json (a fast, byte-level BPE tokenizer is needed)")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    eot = _token_of(tokenizer_file, eos, where)
    return Source(path, "hf", fields, tokenizer_file, eot, weights)


def _safetensors_files(path: Path, where: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{where}: model.safetensors.index.json is malformed ({exc})") from None
        files = [path / name for name in names]
    else:
        files = [path / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        hint = " (only safetensors weights are read; pytorch_model.bin is a pickle)" if (path / "pytorch_model.bin").exists() else ""
        raise ConfigError(f"{where}: missing {', '.join(missing)}{hint}")
    return files


def _token_of(tokenizer_file: Path, token_id: Any, where: str) -> str:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises its own exception type for a malformed file
        raise ConfigError(f"{where}: tokenizer.json is not a valid tokenizer ({first_line(exc)})") from None
    raw = json.loads(tokenizer_file.read_text("utf-8"))
    if (raw.get("model") or {}).get("type") not in ("BPE", "Unigram") or "ByteLevel" not in json.dumps(raw.get("pre_tokenizer")):
        raise ConfigError(f"{where}: its tokenizer is not a byte-level BPE or Unigram (lmtrain's kinds); it cannot be used")
    token = tokenizer.id_to_token(token_id) if isinstance(token_id, int) else None
    if token is None:
        raise ConfigError(f"{where}: config.json names no end-of-text token (eos_token_id) in its tokenizer")
    return token


def _lmtrain_source(path: Path, where: str) -> Source:
    if (path / ckpt.MODEL_FILE).is_file():
        checkpoint, run_dir = path, path.parent.parent
    elif checkpoints_dir(path).is_dir():
        checkpoint, run_dir = ckpt.resolve_checkpoint(checkpoints_dir(path), "latest"), path
    else:
        raise ConfigError(f"{where}: neither a Hugging Face directory (config.json) nor an lmtrain run or "
                          "checkpoint directory")
    try:
        state = ckpt.read_state(checkpoint)  # the weights are read when training starts
    except CheckpointError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    fields = dict(state["model_config"])
    saved = state.get("config") or {}
    specials = (saved.get("tokenizer") or {}).get("special_tokens") or ["<|endoftext|>"]
    tokenizer_file = tokenizer_path(run_dir)
    if not tokenizer_file.is_file():
        raise ConfigError(f"{where}: the run has no tokenizer at {tokenizer_file}")
    return Source(checkpoint, "lmtrain", fields, tokenizer_file, specials[0], [checkpoint / ckpt.MODEL_FILE])


def resolve(config: Config) -> Config:
    """``config`` with the model section and the tokenizer settings that ``model.init_from``
    implies; unchanged without it. A ``model.*`` key set to something else than the source's
    (and not just left at its default) is refused, naming both values."""
    if config.model.init_from is None:
        return config
    source = open_source(config.model.init_from)
    defaults = ArchitectureConfig()
    wanted = source.architecture()
    for name, value in wanted.items():
        mine = getattr(config.model, name)
        if mine != value and mine != getattr(defaults, name):
            raise ConfigError(f"model.{name}: the config says {mine!r}, but model.init_from "
                              f"({config.model.init_from}) has {value!r}; remove the key or make it {value!r}")
    model = dataclasses.replace(config.model, **wanted)
    model.check()
    extra = [t for t in config.tokenizer.special_tokens[1:] if t != source.eot]
    tokenizer = dataclasses.replace(config.tokenizer, vocab_size=int(source.fields["vocab_size"]),
                                    special_tokens=[source.eot] + extra)
    return dataclasses.replace(config, model=model, tokenizer=tokenizer)


