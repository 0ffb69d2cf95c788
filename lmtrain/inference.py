"""Loading a trained checkpoint for inference (sampling and evaluation).

Builds the model from the checkpoint's own model config (the weights' shapes are the truth),
checks that config against the run's ``config.yaml``, and picks the device and precision:
the training precision on a GPU, fp32 on CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmtrain import checkpoint as ckpt
from lmtrain.config import Config, load_config, resolved_config_path
from lmtrain.device import inference_amp_dtype, resolve_device
from lmtrain.errors import CheckpointError, RunDirError
from lmtrain.model import GPT, GPTConfig
from lmtrain.fsutil import read_json, sha256_file
from lmtrain.lora import is_lora_checkpoint
from lmtrain.restore import load_model_weights
from lmtrain.rundir import checkpoints_dir, tokenizer_path
from lmtrain.tokenizer import bos_ids_in, eot_id, load_tokenizer, run_bos_ids

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: "Tokenizer"
    config: Config
    checkpoint: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    eot_id: int
    step: int
    state: dict  # the checkpoint's state.json, read with its weights (once: the trainer may prune it)
    adapters: dict | None = None  # a LoRA checkpoint's own tensors (its adapters), else None
    bos: list = dataclasses.field(default_factory=list)  # ids before every text (a source tokenizer's BOS)
    stop_ids: frozenset = frozenset()  # generation ends at these too: every EOS id of a source's generation_config
    tokenizer_dir: Path | None = None  # where its tokenizer files are (the chat template among them)


def stop_ids(directory: Path) -> frozenset:
    """Every ``eos_token_id`` of ``directory``'s generation_config.json (Llama 3 lists several)."""
    file = directory / "generation_config.json"
    try:
        eos = read_json(file, 1 << 20).get("eos_token_id") if file.is_file() else None
    except (OSError, ValueError, AttributeError):
        return frozenset()
    eos = eos if isinstance(eos, list) else [eos]
    return frozenset(i for i in eos if isinstance(i, int) and not isinstance(i, bool))


def load_run_config(run_dir: Path) -> Config:
    path = resolved_config_path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"no run directory at {run_dir}")
    if not path.exists():
        raise RunDirError(f"{run_dir} has no config.yaml; is it a run directory?")
    return load_config(path)


def load_model(run_dir: Path, checkpoint: str = "best", device: str = "auto") -> LoadedModel:
    """A checkpoint of the run at ``run_dir`` (``latest``, ``best`` or ``step-XXXXXXXX``), ready to
    sample or score; or, when ``run_dir`` is a model rather than a run (a Hugging Face directory,
    an lmtrain checkpoint directory: ``--model``), that model (``load_source_model``)."""
    if not resolved_config_path(run_dir).exists() and ((run_dir / "config.json").is_file() or run_dir.suffix == ".gguf"
                                                        or (run_dir / ckpt.MODEL_FILE).is_file()):
        return load_source_model(run_dir, device)
    config = load_run_config(run_dir)
    directory = checkpoints_dir(run_dir)
    if not ckpt.list_checkpoints(directory):
        raise CheckpointError(f"{run_dir} has no checkpoint yet; train first (`lmtrain train`)")
    path = ckpt.resolve_checkpoint(directory, checkpoint)
    loaded = ckpt.load_checkpoint(path)
    try:
        model_config = GPTConfig(**loaded.model_config)
    except TypeError as exc:
        raise CheckpointError(f"{path}: unreadable model config ({exc})") from None
    _check_against_run_config(model_config, config, path)
    tokenizer = load_tokenizer(run_dir)
    trained_with = loaded.state.get("tokenizer_sha256")
    if trained_with is not None and trained_with != sha256_file(tokenizer_path(run_dir)):
        raise CheckpointError(f"{path} was trained with another tokenizer than {tokenizer_path(run_dir)} "
                              "(it was replaced after training); its text would be wrong. Use the run "
                              "directory the checkpoint belongs with")
    if tokenizer.get_vocab_size() != model_config.vocab_size:
        raise CheckpointError(f"{path}: the model has {model_config.vocab_size} tokens but the run's "
                              f"tokenizer has {tokenizer.get_vocab_size()}")
    torch_device = resolve_device(device, "--device")
    model = GPT(model_config)
    load_model_weights(model, loaded)  # a LoRA checkpoint: its base, the adapters merged in
    model.to(torch_device).eval()
    amp = inference_amp_dtype(loaded.state.get("precision", "fp32"), torch_device)
    return LoadedModel(model, tokenizer, config, path, torch_device, amp,
                       eot_id(tokenizer, config.tokenizer.special_tokens), int(loaded.state["step"]), loaded.state,
                       loaded.tensors if is_lora_checkpoint(loaded.state) else None, run_bos_ids(run_dir, tokenizer),
                       stop_ids(tokenizer_path(run_dir).parent), tokenizer_path(run_dir).parent)


def load_source_model(path: Path, device: str = "auto") -> LoadedModel:
    """A model that ``model.init_from`` could start from, as it is: its architecture, weights and
    tokenizer, the sampling settings at their defaults. What ``--model PATH`` loads, so that a
    model can be measured on one's own data before deciding to fine-tune it."""
    from lmtrain.config import RunConfig
    from lmtrain.pretrained import open_source
    from lmtrain.restore import Pretrained
    from lmtrain.tokenizer import load_tokenizer_file

    source = open_source(str(path), "--model")
    defaults = Config()
    config = dataclasses.replace(
        defaults, run=RunConfig(name=Path(path).name, dir=str(path)),
        model=dataclasses.replace(defaults.model, **source.architecture(), init_from=str(path)),
        tokenizer=dataclasses.replace(defaults.tokenizer, vocab_size=source.fields["vocab_size"],
                                      special_tokens=[source.eot]))
    model = GPT(GPTConfig(**source.fields))
    Pretrained(source).weights(model)
    torch_device = resolve_device(device, "--device")
    model.to(torch_device).eval()
    tokenizer = load_tokenizer_file(source.tokenizer_file)
    bos = bos_ids_in(source.tokenizer_file.parent, tokenizer)
    return LoadedModel(model, tokenizer, config, Path(path), torch_device, inference_amp_dtype("bf16", torch_device),
                       eot_id(tokenizer, [source.eot]), 0, {}, None, bos, stop_ids(source.tokenizer_file.parent),
                       source.tokenizer_file.parent)


def _check_against_run_config(model_config: GPTConfig, config: Config, path: Path) -> None:
    diffs = ckpt.model_config_diffs(model_config.to_dict(), vars(config.model))
    if diffs:
        raise CheckpointError(f"{path} does not match the run's config.yaml ({'; '.join(diffs)})")
