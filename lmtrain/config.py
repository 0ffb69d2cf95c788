"""Typed run configuration: YAML in, validated dataclasses out, resolved YAML back.

One YAML file describes a run; each top-level key is a section, each section a dataclass below.
Loading is strict, because a typo in a config should cost a second, not an hour of training:
unknown sections and keys are rejected with the closest valid name, values are checked for type
and range and named with their dotted key, and nothing is written before all of it passes.
YAML is read with ``yaml.SafeLoader`` only (and a key given twice is refused), so a config can
never execute code.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from lmtrain.errors import ConfigError, first_line


def _opt(default: Any = None, *, ge=None, gt=None, le=None, lt=None, help: str = "", **kw):
    """A config field with optional numeric bounds, kept in the field's metadata."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = _opt("default", help="name of the run; the default run.dir is runs/<name>")
    dir: Optional[str] = _opt(None, help="where every artifact of the run is written")
    seed: int = _opt(1337, ge=0, help="seeds initialisation, data order and sampling")

    def check(self) -> None:
        if not self.name.strip():
            raise ConfigError("run.name: must not be empty")
        if "/" in self.name or "\\" in self.name or self.name.strip() in (".", "..") or "\0" in self.name:
            raise ConfigError(f"run.name: {self.name!r} must be a plain name (no /, no ..): the run goes to "
                              "runs/<name>; set run.dir to put it elsewhere")
        self.dir = str(Path("runs") / self.name) if self.dir is None else os.path.expanduser(self.dir)


@dataclass
class MixtureSource:
    """One source of ``data.mixture``."""

    source: str = _opt("", help="file, directory, glob or hf:owner/name, as data.source")
    weight: float = _opt(1.0, gt=0.0, le=1000.0, help="times each of its records is seen per epoch (0.5: half of them)")
    format: Optional[Literal["text", "chat"]] = _opt(None, help="text or chat; null means data.format")

    def check(self, key: str) -> None:
        if not self.source.strip():
            raise ConfigError(f"{key}.source: must not be empty")


MAX_MIXTURE_SOURCES = 63  # the shards' flag byte numbers them in 6 bits
BATCH_DATA_KEYS = ("packing", "too_long")  # how batches are cut: nothing a tokenizer or shard depends on


def data_settings(data: "DataConfig") -> dict[str, Any]:
    """What a run's data is made of, for the tokenizer's and the shards' fingerprints: the data
    section without the keys that only cut batches (``BATCH_DATA_KEYS``, a mixture's weights)."""
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in BATCH_DATA_KEYS}
    if settings.get("mixture"):
        settings["mixture"] = [{k: v for k, v in entry.items() if k != "weight"} for entry in settings["mixture"]]
    return settings


@dataclass
class DataConfig:
    source: str = _opt("builtin:pystdlib", help="file, directory, glob, hf:owner/name or builtin:pystdlib")
    text_field: str = _opt("text", help="column holding the text in .jsonl/.json/.parquet/.csv")
    sample_by: Literal["document", "paragraph", "line"] = _opt(
        "document", help="how .txt files are cut into documents"
    )
    hf_config: Optional[str] = _opt(None, help="configuration name of an hf: dataset")
    hf_split: str = _opt("train", help="split of an hf: dataset")
    val_fraction: float = _opt(0.005, ge=0.0, lt=1.0, help="share of documents held out for validation")
    val_source: Optional[str] = _opt(None, help="a separate validation corpus (then nothing is held out)")
    max_documents: Optional[int] = _opt(None, gt=0, help="read at most this many documents of data.source")
    format: Literal["text", "chat"] = _opt(
        "text", help="text, or chat: conversation records (messages, ShareGPT, Alpaca, prompt/completion)")
    bad_records: Literal["error", "skip"] = _opt(
        "error", help="chat: a malformed record stops the shard stage (error) or is counted and left out (skip)")
    packing: Literal["pack", "pad"] = _opt(
        "pack", help="chat: whole conversations packed into each row, each seeing only itself (pack), or one per row (pad)")
    too_long: Literal["cut", "skip"] = _opt(
        "cut", help="chat: a conversation longer than model.block_size is cut to it, or left out (skip); counted")
    mixture: list[MixtureSource] = _opt(
        [], help="chat: several sources with weights, [{source, weight, format}], in place of data.source; "
                 "text sources are trained on every token")

    def check(self) -> None:
        if not self.source.strip():
            raise ConfigError("data.source: must not be empty")
        if self.mixture:
            if self.format != "chat":
                raise ConfigError("data.mixture: mixes sources into conversation shards; set data.format: chat "
                                  "(for several text corpora, give data.source a directory or a glob)")
            if len(self.mixture) > MAX_MIXTURE_SOURCES:
                raise ConfigError(f"data.mixture: at most {MAX_MIXTURE_SOURCES} sources, got {len(self.mixture)}")
            for i, part in enumerate(self.mixture):
                part.check(f"data.mixture[{i}]")
        if self.val_source is None and self.val_fraction <= 0.0:
            raise ConfigError(
                "data.val_fraction: must be > 0 unless data.val_source gives a validation corpus"
            )


@dataclass
class TokenizerConfig:
    model: Literal["bpe", "unigram"] = _opt("bpe", help="bpe (byte-level BPE) or unigram (byte-level Unigram)")
    vocab_size: int = _opt(8192, ge=1, le=1 << 24, help="size of the vocabulary, specials included")
    min_frequency: int = _opt(2, ge=1, help="bpe: a pair must occur this often to be merged")
    special_tokens: list[str] = _opt(
        ["<|endoftext|>"], help="special tokens; the first is the end-of-text token"
    )
    chat_template: Optional[str] = _opt(
        None, help="chat: the Jinja chat template; null means the source model's, or lmtrain's ChatML "
                   "(whose <|im_start|> and <|im_end|> are then added as special tokens)")

    def check(self) -> None:
        if not self.special_tokens:
            raise ConfigError("tokenizer.special_tokens: needs at least one token (the end-of-text token)")
        if any(not tok for tok in self.special_tokens):
            raise ConfigError("tokenizer.special_tokens: tokens must be non-empty strings")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError("tokenizer.special_tokens: tokens must be unique")
        minimum = 256 + len(self.special_tokens)
        if self.vocab_size < minimum:
            raise ConfigError(
                f"tokenizer.vocab_size: must be at least {minimum} (256 byte tokens + "
                f"{len(self.special_tokens)} special tokens), got {self.vocab_size}"
            )


@dataclass
class ShardConfig:
    shard_tokens: int = _opt(100_000_000, ge=1024, help="tokens per shard file; the last may be shorter")
    num_proc: Optional[int] = _opt(None, ge=1, help="encoder threads; null means the CPU count")


@dataclass
class ArchitectureConfig:
    """The model's shape: the one schema that ``model.GPTConfig`` extends with the vocabulary size."""

    n_layer: int = _opt(4, ge=1, help="transformer blocks")
    n_head: int = _opt(4, ge=1, help="attention heads per block")
    n_embd: int = _opt(128, ge=8, help="width of the residual stream")
    block_size: int = _opt(256, ge=8, help="context length in tokens")
    dropout: float = _opt(0.0, ge=0.0, lt=1.0, help="dropout probability")
    bias: bool = _opt(False, help="biases in linear layers and LayerNorm")
    pos_embedding: Literal["learned", "rope"] = _opt("learned", help="learned (GPT-2) or rope")
    norm: Literal["layernorm", "rmsnorm"] = _opt("layernorm", help="normalisation layer")
    mlp: Literal["gelu", "swiglu", "relu2"] = _opt("gelu", help="gelu or relu2 (squared ReLU) with 4x width, or swiglu")
    tie_embeddings: bool = _opt(True, help="share the token embedding with the LM head")
    rope_theta: float = _opt(10000.0, gt=0.0, help="base of the rotary frequencies")
    qk_norm: bool = _opt(False, help="RMSNorm on each head's queries and keys (before RoPE)")
    logit_softcap: float = _opt(0.0, ge=0.0, help="cap * tanh(logits / cap) on the output logits; 0 is off")
    zero_init_proj: bool = _opt(False, help="the projections into the residual stream (and an untied head) start at zero")
    # What real checkpoints need (Llama 3, Qwen2/3, SmolLM2, Mistral); each default computes what
    # lmtrain always computed.
    n_kv_head: int = _opt(0, ge=0, help="key/value heads (grouped-query attention; 1 is multi-query); 0 means model.n_head")
    head_dim: int = _opt(0, ge=0, help="size of each attention head; 0 means model.n_embd / model.n_head")
    mlp_hidden: int = _opt(0, ge=0, help="the MLP's inner width; 0 means 4 x n_embd (gelu, relu2) or SwiGLU's 8/3 x, rounded up to 64")
    norm_eps: float = _opt(0.0, ge=0.0, lt=0.1, help="epsilon of the norms; 0 means 1e-6 for rmsnorm and qk_norm, 1e-5 for layernorm")
    qkv_bias: bool = _opt(False, help="biases on the q, k and v projections only (Qwen2), beside model.bias")
    rope_scaling: Literal["none", "llama3"] = _opt("none", help="rope frequency scaling: none, or llama3 (Llama 3.1/3.2), as transformers computes it")
    rope_scaling_factor: float = _opt(8.0, gt=0.0, help="llama3 rope scaling: factor")
    rope_low_freq_factor: float = _opt(1.0, gt=0.0, help="llama3 rope scaling: low_freq_factor")
    rope_high_freq_factor: float = _opt(4.0, gt=0.0, help="llama3 rope scaling: high_freq_factor")
    rope_original_context: int = _opt(8192, ge=1, help="llama3 rope scaling: original_max_position_embeddings")
    hf_class: Optional[str] = _opt(None, help="the transformers class this model is (set from model.init_from); exports write it")
    hf_context: int = _opt(0, ge=0, help="a rotary source's own context when model.block_size is shorter; exports write it (0: block_size)")

    def check(self) -> None:
        if self.n_embd % self.n_head and not self.head_dim:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head}): "
                              "each key/value head serves the same number of query heads")
        head = self.head_dim or self.n_embd // self.n_head
        if self.pos_embedding == "rope" and head % 2:
            raise ConfigError(
                f"model.pos_embedding: rope needs an even head size, but model.n_embd / model.n_head "
                f"= {self.n_embd} / {self.n_head} = {self.n_embd // self.n_head}"
            )
        if self.rope_scaling != "none" and self.pos_embedding != "rope":
            raise ConfigError(f"model.rope_scaling {self.rope_scaling} scales rotary positions: it needs "
                              "model.pos_embedding: rope")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError("model.rope_high_freq_factor must be above model.rope_low_freq_factor")


@dataclass
class ModelConfig(ArchitectureConfig):
    """The ``model`` section: the architecture, and where its first weights come from."""

    init_from: Optional[str] = _opt(
        None, help="start from these weights: a Hugging Face directory (llama, gpt2) or an lmtrain run/checkpoint")


# The projections of a block that LoRA can adapt: attention's query, key, value and output, and
# the MLP's gate (SwiGLU only), up and down projections (lmtrain.lora).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class TrainConfig:
    batch_size: int = _opt(16, ge=1, help="sequences per device per micro-step")
    grad_accum: int = _opt(1, ge=1, help="micro-steps per optimiser step")
    max_steps: int = _opt(1000, ge=1, help="optimiser steps in total")
    max_minutes: Optional[float] = _opt(None, gt=0.0, help="wall-clock budget: the schedule is fitted to it")
    max_epochs: Optional[float] = _opt(None, gt=0.0, le=1e6, help="passes over the training tokens: the schedule "
                                       "ends there if train.max_steps or train.max_minutes would run longer")
    fit_to_budget: bool = _opt(True, help="with max_minutes: choose max_steps so the schedule ends in time; "
                                          "false keeps max_steps and only stops at the budget (resume later)")
    lr: float = _opt(1e-3, gt=0.0, le=1.0, help="peak learning rate")
    min_lr: float = _opt(1e-4, ge=0.0, le=1.0, help="learning rate at the end of the decay")
    warmup_steps: int = _opt(100, ge=0, help="linear warmup from 0 to lr")
    schedule: Literal["cosine", "wsd", "constant"] = _opt("cosine", help="cosine, wsd or constant")
    decay_fraction: float = _opt(0.2, gt=0.0, le=1.0, help="wsd: share of steps spent decaying")
    weight_decay: float = _opt(0.1, ge=0.0, help="AdamW decoupled weight decay (matrices only)")
    beta1: float = _opt(0.9, ge=0.0, lt=1.0, help="AdamW beta1")
    beta2: float = _opt(0.95, ge=0.0, lt=1.0, help="AdamW beta2")
    grad_clip: float = _opt(1.0, ge=0.0, help="clip the gradient norm to this; 0 turns clipping off")
    distill_from: Optional[str] = _opt(None, help="a teacher (lmtrain run or HF directory, same tokenizer) to distill")
    distill_alpha: float = _opt(0.5, ge=0.0, le=1.0, help="distill: weight of the KL to the teacher (1 - it: the data's CE)")
    distill_temperature: float = _opt(1.0, gt=0.0, help="distill: softmax temperature of both distributions in the KL")
    lora_rank: int = _opt(0, ge=0, help="LoRA: rank of the adapters on model.init_from's frozen weights; 0 trains every weight")
    lora_alpha: float = _opt(16.0, gt=0.0, help="LoRA: the adapters' update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = _opt(0.0, ge=0.0, lt=1.0, help="LoRA: dropout on the adapters' input")
    lora_targets: list[str] = _opt(["q", "k", "v", "o"], help="LoRA: projections that get adapters: q, k, v, o, gate, up, down")
    lora_train_norms: bool = _opt(False, help="LoRA: train the normalisation weights too (they are small)")
    optimizer: Literal["adamw", "muon"] = _opt("adamw", help="adamw, or muon for the block matrices")
    muon_lr: float = _opt(0.02, gt=0.0, le=1.0, help="muon: peak learning rate of the block matrices")
    muon_momentum: float = _opt(0.95, ge=0.0, lt=1.0, help="muon: momentum (Nesterov)")
    muon_weight_decay: float = _opt(0.0, ge=0.0, help="muon: decoupled weight decay of the block matrices")
    muon_ns_steps: int = _opt(5, ge=1, le=20, help="muon: Newton-Schulz iterations")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = _opt(
        "original", help="muon: per-matrix learning-rate scaling (torch.optim.Muon adjust_lr_fn)")
    eval_every: int = _opt(100, ge=1, help="steps between evaluations")
    early_stop: int = _opt(3, ge=0, help="evaluations without a new best val loss before the run decays its "
                                         "learning rate and ends; 0 never stops early")
    eval_batches: int = _opt(20, ge=1, help="val batches per evaluation")
    checkpoint_every: int = _opt(500, ge=1, help="steps between checkpoints")
    keep_checkpoints: int = _opt(3, ge=1, help="most recent checkpoints kept (plus best)")
    checkpoint_best: bool = _opt(True, help="an evaluation that improves on the best val loss also writes a checkpoint")
    eval_tasks: list[str] = _opt([], help="multiple-choice task files (JSONL) scored at every evaluation")
    eval_tasks_limit: Optional[int] = _opt(None, ge=1, help="score the first N items of each task file")
    log_every: int = _opt(10, ge=1, help="steps between log lines and TensorBoard points")
    sample_every: int = _opt(0, ge=0, help="steps between TensorBoard text samples; 0 turns them off")
    max_bad_steps: int = _opt(10, ge=1, help="non-finite steps in a row before training stops")
    device: Literal["auto", "cpu", "cuda", "mps"] = _opt("auto", help="auto, cpu, cuda or mps")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _opt("auto", help="auto, bf16, fp16 or fp32")
    parallel: Literal["ddp", "fsdp"] = _opt(
        "ddp", help="under torchrun: ddp (a replica per process) or fsdp (weights, gradients, optimiser sharded)")
    activation_checkpointing: Literal["none", "full", "selective"] = _opt(
        "none", help="recompute block activations in the backward pass: full or selective")
    compile: Literal["auto", "true", "false"] = _opt("auto", help="torch.compile: auto means on CUDA")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _opt(
        "default", help="torch.compile mode; reduce-overhead replays CUDA graphs")
    peak_tflops: Optional[float] = _opt(None, gt=0.0, help="device peak for MFU; overrides the table")
    loss_on: Literal["assistant", "all"] = _opt(
        "assistant", help="chat: the loss covers the assistant's messages and their end-of-turn tokens, or all tokens")

    def check(self) -> None:
        if self.lora_rank:
            unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
            if unknown:
                raise ConfigError(f"train.lora_targets: unknown projection {unknown[0]!r}"
                                  f"{_did_you_mean(unknown[0], LORA_TARGETS)} (choose from {', '.join(LORA_TARGETS)})")
            if not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
                raise ConfigError("train.lora_targets: needs at least one projection, each named once "
                                  f"(from {', '.join(LORA_TARGETS)})")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.compile_mode in ("reduce-overhead", "max-autotune") and self.grad_accum > 1:
            # A replayed graph reuses its output memory, and with accumulation the gradients of
            # one micro-step are still held when the next replay overwrites them.
            raise ConfigError(f"train.compile_mode {self.compile_mode} replays CUDA graphs and needs "
                              f"train.grad_accum 1 (got {self.grad_accum}); raise train.batch_size instead, "
                              f"or use compile_mode default or max-autotune-no-cudagraphs")


@dataclass
class SampleConfig:
    prompt: str = _opt("", help="text to continue; empty starts from the end-of-text token")
    max_new_tokens: int = _opt(200, ge=1, help="tokens to generate per sample")
    temperature: float = _opt(0.8, ge=0.0, help="softmax temperature; 0 means greedy")
    top_k: Optional[int] = _opt(50, ge=1, help="sample from the k most likely tokens; null for all")
    top_p: float = _opt(1.0, gt=0.0, le=1.0, help="nucleus sampling: smallest set with this mass")
    num_samples: int = _opt(1, ge=1, help="samples to generate")
    seed: Optional[int] = _opt(None, ge=0, help="sampling seed; null means run.seed")
    stop: list[str] = _opt([], help="stop generating at any of these strings")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # The keys ("model.n_head", ...) that the user wrote, in a config file or with --set: not the
    # embedded default's, nor a dataclass default. model.init_from compares only these with its source.
    given: frozenset = field(default=frozenset(), compare=False, repr=False)

    @property
    def run_dir(self) -> Path:
        assert self.run.dir is not None  # filled in by RunConfig.check
        return Path(self.run.dir)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS: dict[str, type] = {k: v for k, v in typing.get_type_hints(Config).items() if k != "given"}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

DEFAULT_CONFIG_NAME = "default.yaml"


def default_config_text() -> str:
    """The embedded default config, shipped inside the package."""
    return resources.files("lmtrain").joinpath("configs", DEFAULT_CONFIG_NAME).read_text("utf-8")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the embedded default), apply ``--set`` overrides, validate.

    Raises ``ConfigError`` with a one-line message for every problem a user can make.
    """
    given: set[str] = set()
    if path is None:
        raw = _parse_yaml(default_config_text(), "the embedded default config")
        origin = "the embedded default config"
    else:
        raw = _read_yaml_file(Path(path))
        origin = str(path)
        given = {f"{name}.{key}" for name, values in (raw.items() if isinstance(raw, dict) else ())
                 if isinstance(values, dict) for key in values}
    for override in overrides:
        _apply_override(raw, override)
        given.add(override.split("=", 1)[0].strip())
    return config_from_dict(raw, origin, frozenset(given))


def config_from_dict(raw: dict[str, Any], origin: str = "config", given: frozenset | None = None) -> Config:
    """Validate a plain dict (as YAML gives it) into a ``Config``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: must be a mapping of sections (run, data, ...), got {_kind(raw)}")
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section {name!r}{_did_you_mean(str(name), SECTIONS)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: section {name!r} must be a mapping of keys, got {_kind(value)}")
        sections[name] = _build_section(name, SECTIONS[name], value, origin)
    if given is None:  # everything the dict holds was written by its author
        given = frozenset(f"{name}.{key}" for name, values in raw.items() if isinstance(values, dict) for key in values)
    config = Config(**sections, given=given)
    for name in SECTIONS:
        section = getattr(config, name)
        if hasattr(section, "check"):
            section.check()
    _check_across_sections(config)
    return config


def _check_across_sections(config: Config) -> None:
    """What keys of two sections allow only together, refused when the config is loaded: before
    `lmtrain run` (or any stage) writes anything. Every problem found is named at once."""
    tc, problems = config.train, []
    if tc.lora_rank and config.model.init_from is None:
        problems.append("train.lora_rank: LoRA adapts trained weights and needs model.init_from (an lmtrain run or "
                        "checkpoint, or a Hugging Face directory); set it, or train.lora_rank: 0 to train every weight")
    if tc.lora_rank and tc.optimizer == "muon" and "train.optimizer" in config.given:
        problems.append("train.optimizer muon orthogonalises whole weight matrices; LoRA's adapters train with "
                        "adamw: set train.optimizer: adamw, or train.lora_rank: 0")
    if problems:
        raise ConfigError("; and ".join(problems))


def _read_yaml_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    raw = _parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"config file {path} is empty; it needs sections such as run: and data:")
    return raw


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping: YAML would keep
    the last one silently, and a config with ``lr`` set twice is a mistake to name, not guess."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (given twice in one section)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        loader = _StrictLoader(text)  # a SafeLoader: no tag can build a Python object
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark is not None else origin
        problem = getattr(exc, "problem", None) or first_line(exc)
        if "could not determine a constructor" in str(exc):
            problem = "tags that construct Python objects are not allowed in configs"
        raise ConfigError(f"invalid YAML in {where}: {problem}") from None


def _apply_override(raw: Any, override: str) -> None:
    if not isinstance(raw, dict):
        return  # config_from_dict reports the shape problem
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. --set train.lr=3e-4")
    section, dot, name = key.partition(".")
    if not dot or not section or not name or "." in name:
        raise ConfigError(f"--set {override!r}: the key must be section.key, e.g. tokenizer.vocab_size")
    if section not in SECTIONS:
        raise ConfigError(f"--set {override!r}: unknown section {section!r}{_did_you_mean(section, SECTIONS)}")
    known = {f.name for f in dataclasses.fields(SECTIONS[section])}
    if name not in known:
        raise ConfigError(
            f"--set {override!r}: unknown key {key}{_did_you_mean(name, known, prefix=section + '.')}"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not a YAML scalar: keep the raw string, type checks decide
    target = raw.setdefault(section, {})
    if target is None:
        target = raw[section] = {}
    if not isinstance(target, dict):
        raise ConfigError(f"--set {override!r}: section {section!r} in the config is not a mapping")
    target[name] = value


def override_section(section: Any, name: str, overrides: dict[str, Any], labels: dict[str, str]) -> Any:
    """``section`` with ``overrides`` applied, each checked like a config value but named by its
    label (``--temperature``, say): command-line options that stand in for config keys are
    validated by the same schema, in one place."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    checked = {}
    for key, value in overrides.items():
        label = labels.get(key, f"{name}.{key}")
        value = _coerce(label, value, hints[key])
        _check_option_range(label, value, fields[key].metadata)
        checked[key] = value
    result = dataclasses.replace(section, **checked)
    if hasattr(result, "check"):
        result.check()
    return result


def check_section(name: str, values: dict[str, Any], origin: str) -> Any:
    """The section ``name`` built from ``values`` (a source's, say) as a config file's would be:
    every type and bound checked, then the section's own checks."""
    section = _build_section(name, SECTIONS[name], values, origin)
    if hasattr(section, "check"):
        section.check()
    return section


def adopted(config: "Config", section: str, values: dict[str, Any], origin: str) -> "Config":
    """``config`` with ``values`` in ``section`` if the section then passes every check a config
    file's would (``check_section``); else ``config`` as it was. For values read back from a file
    lmtrain wrote: a crafted one's are compared with what was trained later, never adopted."""
    try:
        built = check_section(section, {**dataclasses.asdict(getattr(config, section)), **values}, origin)
    except ConfigError:
        return config
    return dataclasses.replace(config, **{section: built})


def _build_fields(key: str, cls: type, values: dict[str, Any]) -> Any:
    """A nested config record (a ``data.mixture`` entry): every field checked like a section's."""
    return _build(cls, values, key, lambda name, fields: f"{key}: unknown key {name!r}{_did_you_mean(str(name), fields)}")


def _build_section(name: str, cls: type, values: dict[str, Any], origin: str) -> Any:
    return _build(cls, values, name, lambda key, fields: f"{origin}: unknown key {name}.{key}"
                                                         f"{_did_you_mean(str(key), fields, prefix=name + '.')}")


def _build(cls: type, values: dict[str, Any], prefix: str, unknown) -> Any:
    """``cls`` from ``values``, each key known (``unknown(key, fields)`` says what is not), of its
    annotated type and in its bounds, named ``prefix.key`` in any error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(unknown(key, fields))
        dotted = f"{prefix}.{key}"
        value = _coerce(dotted, value, hints[key])
        _check_range(dotted, value, fields[key].metadata)
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; return it in canonical form."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in args:
            value = str(value).lower()  # YAML reads `compile: true` as a bool
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: must be one of {allowed}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({', '.join(f.name for f in dataclasses.fields(hint))}), "
                              f"got {_kind(value)} {value!r}")
        return _build_fields(key, hint, value)
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_kind(value)} {value!r}")
        return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_kind(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            # YAML 1.1 reads `1e9` (no dot) as a string; a whole number written so is an integer.
            try:
                value = float(value)
            except ValueError:
                pass
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value != int(value)):
            raise ConfigError(f"{key}: expected an integer, got {_kind(value)} {value!r}")
        return int(value)
    if hint is float:
        # PyYAML follows YAML 1.1, which reads `3e-4` (no dot) as a string: accept it as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_kind(value)} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {_kind(value)} {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {hint!r} for {key}")  # a bug of ours


def _check_range(key: str, value: Any, meta: Any) -> None:
    if value is None or isinstance(value, (str, bool, list)):
        return
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for name, sign, ok in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            allowed = " and ".join(f"{s} {meta[n]}" for n, s, _ in bounds if meta.get(n) is not None)
            raise ConfigError(f"{key}: must be {allowed}, got {value!r}")


def _check_option_range(label: str, value: Any, meta: Any) -> None:
    """Like ``_check_range``, worded for a command-line option: ``--top-p must be in (0, 1]``."""
    if value is None or isinstance(value, (str, bool, list)):
        return
    low = ("(", meta["gt"]) if meta.get("gt") is not None else ("[", meta["ge"]) if meta.get("ge") is not None else None
    high = (")", meta["lt"]) if meta.get("lt") is not None else ("]", meta["le"]) if meta.get("le") is not None else None
    if low and high:
        allowed = f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif low:
        allowed = f"{'>' if low[0] == '(' else '>='} {low[1]:g}"
    elif high:
        allowed = f"{'<' if high[0] == ')' else '<='} {high[1]:g}"
    else:
        return
    ok = ((low is None or (value > low[1] if low[0] == "(" else value >= low[1]))
          and (high is None or (value < high[1] if high[0] == ")" else value <= high[1])))
    if not ok:
        raise ConfigError(f"{label} must be {allowed}, got {value!r}")


def describe_keys(section: str | None = None) -> str:
    """Every config key (or ``section``'s) with its default, bounds and what it does, one a line:
    the reference ``lmtrain keys`` prints, from the fields themselves."""
    if section is not None and section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}{_did_you_mean(section, SECTIONS)}; the sections are "
                          f"{', '.join(SECTIONS)}")
    lines = []
    for name, cls in SECTIONS.items():
        if section not in (None, name):
            continue
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            bounds = [f"{op} {f.metadata[key]:g}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                      if f.metadata.get(key) is not None]
            choices = typing.get_args(typing.get_type_hints(cls)[f.name])
            if all(isinstance(c, str) for c in choices) and choices:
                bounds.append("one of " + ", ".join(choices))
            shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
            extra = f" ({'; '.join(bounds)})" if bounds else ""
            lines.append(f"{name}.{f.name} = {shown}{extra}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _did_you_mean(word: str, candidates: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def resolved_config_path(run_dir: Path) -> Path:
    return run_dir / "config.yaml"
