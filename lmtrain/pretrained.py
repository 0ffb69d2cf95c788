"""``model.init_from``: start a run from someone else's weights (fine-tuning).

A source is a Hugging Face model directory on disk (``config.json`` + safetensors, sharded or not,
of ``LlamaForCausalLM`` (SmolLM2, TinyLlama, Llama 3.x), ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` or ``GPT2LMHeadModel``) or an lmtrain run directory or
checkpoint. Nothing is ever downloaded. From the source come:

- the architecture: ``resolve(config)`` fills the ``model`` section from it (grouped-query
  attention, head size, MLP width, norm epsilon, q/k/v biases, llama3 rope scaling and the class
  included), and refuses a ``model.*`` key the user set to something else (naming both values);
- the tokenizer: ``lmtrain tokenize`` copies the source's instead of training one (it must be a
  byte-level BPE), and its end-of-text token becomes ``tokenizer.special_tokens[0]``;
- the weights: ``lmtrain train`` loads them into the new model (the vocabulary padded as usual)
  and starts a fresh optimiser (``lmtrain.restore.Pretrained``). A run that has checkpoints
  resumes from them instead.

This module reads a source's configuration only, never its weights.

What lmtrain cannot compute exactly (other rope scalings, activations, a sliding window shorter
than the context) is refused with one line and the reason, never approximated.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtrain import checkpoint as ckpt
from lmtrain.config import Config, check_section
from lmtrain.errors import CheckpointError, ConfigError, first_line, quoted
from lmtrain.fsutil import read_json
from lmtrain.hf_format import model_fields_from_hf
from lmtrain.rundir import checkpoints_dir, tokenizer_path

log = logging.getLogger("lmtrain.train")

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CONFIG_LIMIT = 1 << 20  # bytes: a config.json or index is kilobytes
TOKENIZER_LIMIT = 64 << 20  # bytes: the largest real tokenizer.json (256k tokens) is about 35 MB


@dataclass
class Source:
    """A resolved ``model.init_from``."""

    path: Path
    kind: str  # "hf", "gguf" or "lmtrain"
    fields: dict[str, Any]  # architecture fields and vocab_size
    tokenizer_file: Path
    eot: str  # the source's end-of-text token
    weights: list[Path]  # safetensors files (an lmtrain checkpoint: its model.safetensors)
    tokens: frozenset[str] = frozenset()  # every token of its tokenizer, added ones included

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
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_source(path, where)
    return _lmtrain_source(path, where)


def _source_json(file: Path, where: str, limit: int = CONFIG_LIMIT) -> Any:
    """A source's JSON file (config.json, an index), size-checked before it is read: a crafted one
    is one line, never gigabytes of memory or a traceback."""
    try:
        return read_json(file, limit)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {file.name} is not readable JSON ({first_line(exc, 80)})") from None


def _hf_source(path: Path, where: str) -> Source:
    hf = _source_json(path / "config.json", where)
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: config.json is not a JSON object")
    fields = model_fields_from_hf(hf, where)
    weights = _safetensors_files(path, where)
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        hint = (" (only a SentencePiece tokenizer.model: `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` in "
                "transformers writes the tokenizer.json lmtrain reads)") if (path / "tokenizer.model").is_file() else ""
        raise ConfigError(f"{where}: no tokenizer.json{hint}")
    tokenizer = _read_tokenizer(tokenizer_file, where)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > fields["vocab_size"]:
        raise ConfigError(f"{where}: config.json's vocab_size {fields['vocab_size']} is smaller than its tokenizer "
                          f"({size} tokens): the ids past {fields['vocab_size'] - 1} would have no embedding")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    eot = _token(tokenizer, eos)
    if eot is None:
        raise ConfigError(f"{where}: config.json names no end-of-text token (eos_token_id) in its tokenizer")
    return Source(path, "hf", fields, tokenizer_file, eot, weights, frozenset(tokenizer.get_vocab(True)))


def _safetensors_files(path: Path, where: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _source_json(index, where)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConfigError(f"{where}: model.safetensors.index.json has no weight_map of file names")
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
        if outside:
            raise ConfigError(f"{where}: model.safetensors.index.json names {quoted(outside[0])}, not a file of "
                              "the source directory; refusing it")
        files = [path / name for name in names]
    else:
        files = [path / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        hint = " (only safetensors weights are read; pytorch_model.bin is a pickle)" if (path / "pytorch_model.bin").exists() else ""
        raise ConfigError(f"{where}: missing {', '.join(missing)}{hint}")
    return files


def _token(tokenizer, token_id: Any) -> str | None:
    """The token of ``token_id`` (a source's eos_token_id) in ``tokenizer``, or None when it is not
    one of its ids (not a whole number, or out of range: tokenizers overflows on a huge one)."""
    known = isinstance(token_id, int) and not isinstance(token_id, bool)
    return tokenizer.id_to_token(token_id) if known and 0 <= token_id < tokenizer.get_vocab_size(True) else None


def _read_tokenizer(tokenizer_file: Path, where: str):
    """A source's tokenizer as it ships, its size checked before it is loaded (a tokenizer.json of
    10 M merges took 15 GB to load): byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM), SentencePiece-
    style BPE with byte fallback (TinyLlama, Mistral, Llama 2), or Unigram."""
    from tokenizers import Tokenizer

    raw = _source_json(tokenizer_file, where, TOKENIZER_LIMIT)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or model.get("type") not in ("BPE", "Unigram"):
        kind = model.get("type") if isinstance(model, dict) else None
        raise ConfigError(f"{where}: its tokenizer is a {quoted(kind)} model; lmtrain reads BPE (byte-level or "
                          "with byte fallback) and Unigram tokenizers")
    try:
        return Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises its own exception type for a malformed file
        raise ConfigError(f"{where}: tokenizer.json is not a valid tokenizer ({first_line(exc)})") from None


# A GGUF file's metadata (llama.cpp's keys, under its architecture's name) -> config.json's keys.
_GGUF_KEYS = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
              "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
              "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
              "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
              "context_length": "max_position_embeddings"}
_GGUF_GPT2_KEYS = {"block_count": "n_layer", "embedding_length": "n_embd", "attention.head_count": "n_head",
                   "attention.layer_norm_epsilon": "layer_norm_epsilon", "context_length": "n_positions"}
_GGUF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}
_gguf_tokenizers: dict[str, Path] = {}  # a GGUF file -> the tokenizer directory rebuilt from it


def _gguf_source(path: Path, where: str) -> Source:
    """A GGUF file (llama.cpp's format) of the llama, qwen2, qwen3 or gpt2 architecture, in any
    type gguf-py dequantizes: its configuration from the file's metadata, its tokenizer (and chat
    template) rebuilt by transformers' GGUF loader (the ``hf`` extra), its weights dequantized
    when training starts (``restore.Pretrained``)."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"{where}: reading GGUF needs the gguf package: pip install 'lmtrain[hf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises assorted errors for what is not a GGUF file
        raise ConfigError(f"{where}: not a readable GGUF file ({first_line(exc, 80)})") from None

    def value(key: str):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture")
    if arch not in _GGUF_MODEL_TYPES:
        raise ConfigError(f"{where}: a GGUF of architecture {quoted(arch)}; lmtrain reads llama, qwen2, qwen3 and "
                          "gpt2 GGUF files")
    if value(f"{arch}.rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise ConfigError(f"{where}: rope scaling in a GGUF file (lmtrain reads it from Hugging Face directories only); "
                          "lmtrain would only approximate this model, so it refuses it")
    keys = _GGUF_GPT2_KEYS if arch == "gpt2" else _GGUF_KEYS
    hf = {theirs: value(f"{arch}.{ours}") for ours, theirs in keys.items() if value(f"{arch}.{ours}") is not None}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ConfigError(f"{where}: the GGUF file has no token_embd.weight")
    hf.update(model_type=_GGUF_MODEL_TYPES[arch], vocab_size=int(embedding.shape[-1]),
              tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
              eos_token_id=value("tokenizer.ggml.eos_token_id"))
    if arch == "qwen2":
        hf["use_sliding_window"] = False
    fields = model_fields_from_hf(hf, where)
    tokenizer_dir = _gguf_tokenizer(path, where)
    tokenizer = _read_tokenizer(tokenizer_dir / "tokenizer.json", where)
    eos = hf["eos_token_id"]
    eot = _token(tokenizer, eos)
    if eot is None:
        raise ConfigError(f"{where}: the GGUF file names no end-of-text token (tokenizer.ggml.eos_token_id)")
    return Source(path, "gguf", fields, tokenizer_dir / "tokenizer.json", eot, [path],
                  frozenset(tokenizer.get_vocab(True)))


def _gguf_tokenizer(path: Path, where: str) -> Path:
    """The tokenizer of a GGUF file as transformers rebuilds it (tokenizer.json, tokenizer_config.json
    with the chat template), in a temporary directory removed when the process ends."""
    key = str(path.resolve())
    if key not in _gguf_tokenizers:
        import atexit
        import shutil
        import tempfile

        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(f"{where}: rebuilding a GGUF file's tokenizer needs transformers: "
                              "pip install 'lmtrain[hf]'") from None
        directory = Path(tempfile.mkdtemp(prefix="lmtrain-gguf-tokenizer-"))
        atexit.register(shutil.rmtree, directory, True)
        try:
            AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(directory))
        except Exception as exc:  # transformers' GGUF converter raises whatever its parts raise
            raise ConfigError(f"{where}: transformers cannot rebuild its tokenizer ({first_line(exc, 120)})") from None
        _gguf_tokenizers[key] = directory
    return _gguf_tokenizers[key]


def _lmtrain_source(path: Path, where: str) -> Source:
    if (path / ckpt.MODEL_FILE).is_file():
        checkpoint, run_dir = path, path.parent.parent
    elif checkpoints_dir(path).is_dir():
        checkpoint, run_dir = ckpt.resolve_checkpoint(checkpoints_dir(path), "best"), path
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
    tokens = frozenset(_read_tokenizer(tokenizer_file, where).get_vocab(True))
    return Source(checkpoint, "lmtrain", fields, tokenizer_file, specials[0], [checkpoint / ckpt.MODEL_FILE], tokens)


FINE_TUNING_LR = 5e-5  # AdamW's peak rate for a whole model started from trained weights
LORA_LR = 2e-4  # ... and for LoRA adapters, which start at zero and are few


def resolve(config: Config) -> Config:
    """``config`` with the model section and the tokenizer settings that ``model.init_from``
    implies; unchanged without it.

    The architecture is the source's. Only the ``model.*`` keys the user wrote (``config.given``:
    their config file and ``--set``, not the embedded default's) are compared with it, and a
    different value is refused, naming both, every such key at once; ``model.block_size`` may be
    shorter than a rotary source's context (the training windows). Unless the user chose them,
    fine-tuning trains with AdamW at a fine-tuning rate (``FINE_TUNING_LR``, ``LORA_LR``)."""
    if config.model.init_from is None:
        return config
    where = f"model.init_from {config.model.init_from}"
    source = open_source(config.model.init_from)
    wanted = source.architecture()
    try:  # the source's values within the config's bounds, as if the user had written them
        check_section("model", wanted, where)
    except ConfigError as exc:
        raise ConfigError(f"{where}: its configuration gives {exc}") from None
    mine = {name: getattr(config.model, name) for name in wanted if f"model.{name}" in config.given}
    if "block_size" in mine and wanted["pos_embedding"] == "rope" and mine["block_size"] < wanted["block_size"]:
        # Shorter training windows; the source's context stays in its exports.
        wanted["hf_context"], wanted["block_size"] = wanted["block_size"], mine["block_size"]
    clashes = [f"model.{name}: the config says {value!r}, the source has {wanted[name]!r}"
               for name, value in mine.items() if value != wanted[name]]
    if clashes:
        raise ConfigError(f"{where}: {'; '.join(clashes)}; remove those keys or make them the source's")
    model = dataclasses.replace(config.model, **wanted)
    train = _fine_tuning_defaults(config)
    extra = [t for t in config.tokenizer.special_tokens[1:] if t != source.eot]
    missing = [t for t in extra if t not in source.tokens]
    if missing:
        raise ConfigError(f"tokenizer.special_tokens: {', '.join(quoted(t) for t in missing)} is not a token of "
                          f"{where}'s tokenizer, which is copied as it is; remove it")
    try:
        tokenizer = check_section("tokenizer", {**dataclasses.asdict(config.tokenizer), "special_tokens": [source.eot] + extra,
                                                "vocab_size": source.fields["vocab_size"]}, where)
    except ConfigError as exc:
        raise ConfigError(f"{where}: its configuration gives {exc}") from None
    return dataclasses.replace(config, model=model, tokenizer=tokenizer, train=train)


_said: set[str] = set()  # runs whose fine-tuning choices were logged (resolve runs once per stage)


def _fine_tuning_defaults(config: Config):
    """The ``train`` section for fine-tuning: AdamW at a fine-tuning rate where the user chose no
    optimizer or rate (the embedded default's Muon at 2e-2 is for training from scratch, and
    LoRA's adapters train with AdamW), and says so once."""
    tc, given, changes = config.train, config.given, {}
    if "train.optimizer" not in given and tc.optimizer != "adamw":
        changes["optimizer"] = "adamw"
    if "train.lr" not in given:
        changes["lr"] = LORA_LR if tc.lora_rank else FINE_TUNING_LR
        if "train.min_lr" not in given:
            changes["min_lr"] = changes["lr"] / 10
    if not changes:
        return tc
    train = dataclasses.replace(tc, **changes)
    train.check()
    if str(config.run_dir) not in _said:
        _said.add(str(config.run_dir))
        log.info("model.init_from: fine-tuning with %s (set train.optimizer / train.lr to choose otherwise)",
                 ", ".join(f"train.{k} {v:g}" if isinstance(v, float) else f"train.{k} {v}" for k, v in changes.items()))
    return train


