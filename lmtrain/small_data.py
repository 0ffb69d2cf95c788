"""Defaults for a corpus the run will see many times.

The embedded default trains with Muon at rates tuned on the 12 MB standard-library corpus, less
than one epoch in its time. On a small corpus the same settings fit the training text fast and
then memorise it: measured on 0.5-1 MB corpora (docs/performance.md), the default reached its best
val bpb early and ended 8-22% above it, 7% behind a plain transformers Trainer (AdamW 3e-3, cosine
to 0). So when the run would see its training tokens more than ``SMALL_CORPUS_EPOCHS`` times, and
the user chose none of the optimiser's settings, the run trains with that optimiser recipe, with
``SMALL_BATCH`` sequences a step under a time budget, with a strong weight decay, and ends at
``MAX_EPOCHS``; a run with time for many more passes also trains with dropout (``DROPOUT``), and
goes on longer at a higher rate. It says so in one line (docs/performance.md compares it with the
Trainer). The choice is made once: a resumed run keeps the settings its checkpoint was trained with.
Before all that, `lmtrain tokenize` trains a smaller vocabulary for a corpus under 0.5 MB
(``corpus_vocab``), unless the config sets one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

from lmtrain.config import Config, adopted
from lmtrain.tokenizer import VOCAB_KEY

log = logging.getLogger(__name__)

SMALL_CORPUS_EPOCHS = 2.0
RECIPE = {"optimizer": "adamw", "lr": 3e-3, "min_lr": 0.0, "schedule": "cosine"}
OWN_KEYS = tuple(f"train.{key}" for key in (*RECIPE, "muon_lr"))
# Half the default's sequences per step, twice the steps in the same time: on a corpus this small
# more, noisier updates reach a lower val loss before the model starts to memorise (measured at
# 8-16 sequences: docs/performance.md). Only under a time budget (a run of train.max_steps keeps the
# tokens per step it asked for) and when the config chooses neither the batch nor accumulation.
SMALL_BATCH = 16
BATCH_KEYS = ("train.batch_size", "train.grad_accum")
# Past ~16 passes repeated tokens are worth little (Muennighoff et al. 2023 fit the decay of their
# worth at R* = 15.4 repetitions) and a small model memorises: a schedule that runs on decays from
# a point already past the best. So the run ends at 16 epochs unless the config sets its length.
MAX_EPOCHS = 16.0
# The peak rate for the run's length: 3e-3 was the best of 2e-3-4e-3 over ~800 steps of 16
# sequences, 1e-3 the best of 1e-3-3e-3 over ~2,200 (docs/performance.md), about lr x steps =
# constant between them; no lower than 1e-3, the lowest rate measured.
LONGEST_AT_PEAK, LOWEST_LR = 800, 1e-3
# The tokenizer for a tiny corpus: fewer merges, each piece seen more often. At 4,096 pieces 0.4 MB
# of prose leaves most of them a handful of occurrences, and their embeddings (most of a small
# model's parameters) are learned from almost nothing: 1,024 pieces reached 1.468 val bpb against
# 1.545 (512: 1.487, 2,048: 1.532). Code gains less and only while the run is short (1.0 MB: 1.5%
# better at 1.5 minutes, 1.5% worse at 5; 0.57 MB at 5 minutes: 0.5% worse), so only text under
# SMALL_TEXT_BYTES gets SMALL_VOCAB (docs/performance.md).
SMALL_TEXT_BYTES, SMALL_VOCAB = 500_000, 1024
# Dropout for a run with time for many passes: it lets the model learn from more of them before it
# memorises, and pays once there are passes to spare. Measured on 0.4 MB of prose (1,024 pieces,
# docs/performance.md), with 0.1 against none (16 passes, the cap): 20.6 passes 1.423 val bpb
# against 1.468, 18.6 passes 1.449, 17.3 passes 1.453 against 1.465, 11.9 passes 1.530 against
# 1.466 (a loss), and 32 passes 1.412 (0.2: 1.445). Dropout also slows a step (on a CPU by ~20%:
# model.dropout_scale), so the passes are counted at its own pace: a run that would see its data
# DROPOUT_PASSES times with it trains with DROPOUT and ends after DROPOUT_MAX_EPOCHS, not MAX_EPOCHS.
DROPOUT_KEY, DROPOUT, DROPOUT_PASSES, DROPOUT_MAX_EPOCHS = "model.dropout", 0.1, 17.0, 32.0
# Weight decay for a corpus seen many times, on the weight matrices as always (decaying the
# embedding table too lost on code: 2.0394 against 1.9758). Measured at 1.5 minutes
# (docs/performance.md): code without dropout (~7 passes) 0.1 2.038, 0.5 2.016, 1.0 2.008,
# 2.0 1.976, 4.0 1.996; prose with dropout (~20 passes) 0.1 1.432, 0.3 1.426, 1.0 1.417-1.423,
# 2.0 1.428: dropout regularises too, and with it the decay that pays is half as strong.
DECAY_KEY, WEIGHT_DECAY, DROPOUT_WEIGHT_DECAY = "train.weight_decay", 2.0, 1.0
# With dropout the rate can stay higher for longer: over 2,211 steps (32 passes of that prose)
# 2.2e-3 reached 1.412 where recipe_lr's 1.1e-3 reached 1.432, and 3e-3 over 1,658 steps 1.416.
DROPOUT_LR_STEPS = 2


def recipe_lr(steps: float, dropout: bool = False) -> float:
    """The small-corpus recipe's peak learning rate for a run of ``steps`` steps (with
    ``DROPOUT``: twice as many steps at the peak)."""
    at_peak = LONGEST_AT_PEAK * (DROPOUT_LR_STEPS if dropout else 1)
    return min(RECIPE["lr"], max(LOWEST_LR, RECIPE["lr"] * at_peak / max(steps, 1.0)))


def corpus_vocab(config: Config, train_bytes: int) -> tuple[int, str | None]:
    """The BPE vocabulary to train on ``train_bytes`` bytes of training text (counted up to
    ``SMALL_TEXT_BYTES``), and the line saying so when it is smaller than the config's.
    A vocabulary the user set is theirs, and so is a tokenizer other than BPE."""
    size = config.tokenizer.vocab_size
    if VOCAB_KEY in config.given or config.tokenizer.model != "bpe":
        return size, None
    if train_bytes >= SMALL_TEXT_BYTES or size <= SMALL_VOCAB:
        return size, None
    return SMALL_VOCAB, (f"small corpus: {train_bytes / 1e6:.2g} MB of training text, so the tokenizer has "
                         f"{SMALL_VOCAB:,} pieces rather than {size:,} (each seen more often; docs/performance.md); "
                         f"set {VOCAB_KEY} to choose otherwise")


def planned_epochs(config: Config, unique_tokens: int, tokens_per_step: int,
                   step_seconds: Callable[[Config], float] | None) -> float | None:
    """How many times the run will see its ``unique_tokens``: from ``train.max_steps``, or under
    ``train.max_minutes`` from the pace ``step_seconds(config)`` measures, and no more than
    ``train.max_epochs`` (None when it cannot tell)."""
    tc = config.train
    if not unique_tokens:
        return None
    if tc.max_minutes is not None and tc.fit_to_budget:
        if step_seconds is None:
            return None
        steps = tc.max_minutes * 60 / max(step_seconds(config), 1e-6)
    else:
        steps = tc.max_steps
    epochs = steps * tokens_per_step / unique_tokens
    return epochs if tc.max_epochs is None else min(epochs, tc.max_epochs)


def small_corpus_defaults(config: Config, unique_tokens: int, tokens_per_step: int,
                          step_seconds: Callable[[Config], float] | None,
                          saved: dict[str, Any] | None) -> tuple[Config, str | None]:
    """The config to train with, and the line saying what was chosen (None: nothing changed).
    ``step_seconds(config)``: the pace of a step of ``config`` on this machine; ``saved``: the
    config of the checkpoint a resumed run starts from."""
    if any(key in config.given for key in OWN_KEYS) or config.model.init_from is not None:
        return config, None
    tc = config.train
    budgeted = tc.max_minutes is not None and tc.fit_to_budget
    own_batch = budgeted and not any(key in config.given for key in BATCH_KEYS)
    # the length: a budget's steps are the clock's to decide, a run of train.max_steps the user's
    own_length = "train.max_epochs" not in config.given and (budgeted or "train.max_steps" not in config.given)
    own_dropout = DROPOUT_KEY not in config.given
    own_decay = DECAY_KEY not in config.given
    if saved is not None:  # resuming: the settings the run started with, whatever it would pick now
        return _as_saved(config, saved, own_batch, own_length, own_dropout, own_decay), None
    epochs = planned_epochs(config, unique_tokens, tokens_per_step, step_seconds)
    if epochs is None or epochs <= SMALL_CORPUS_EPOCHS:
        return config, None
    chosen = dict(RECIPE)
    if own_batch and tc.grad_accum == 1 and tc.batch_size > SMALL_BATCH:
        chosen["batch_size"] = SMALL_BATCH
    per_step = tokens_per_step * chosen.get("batch_size", tc.batch_size) / tc.batch_size
    passes_cap, dropout = MAX_EPOCHS, None
    if own_dropout and epochs >= DROPOUT_PASSES:  # (with dropout, no more passes than without)
        # counted again with dropout, at the batch it will train with
        regularised = dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=DROPOUT))
        timed = dataclasses.replace(regularised, train=dataclasses.replace(tc, batch_size=chosen.get("batch_size", tc.batch_size)))
        passes = planned_epochs(timed, unique_tokens, per_step, step_seconds)
        if passes is not None and passes >= DROPOUT_PASSES:
            config, epochs, dropout, passes_cap = regularised, passes, DROPOUT, DROPOUT_MAX_EPOCHS
    if own_decay:
        chosen["weight_decay"] = WEIGHT_DECAY if dropout is None else DROPOUT_WEIGHT_DECAY
    if own_length and epochs > passes_cap:
        chosen["max_epochs"] = passes_cap
    # the steps it will take: its epochs (up to the cap) at the tokens per step it will train with
    steps = min(epochs, chosen.get("max_epochs", math.inf)) * unique_tokens / per_step
    chosen["lr"] = recipe_lr(steps, dropout is not None)
    train = dataclasses.replace(tc, **chosen)
    train.check()
    batch = f", {SMALL_BATCH} sequences a step" if "batch_size" in chosen else ""
    dropped = f", dropout {dropout:g}" if dropout is not None else ""
    decayed = f", weight decay {chosen['weight_decay']:g}" if own_decay else ""
    length = (f", ending after {passes_cap:g} passes (repeats past that are worth little)"
              if "max_epochs" in chosen else "")
    note = (f"small corpus: the run would see its {unique_tokens:,} training tokens about {epochs:.1f} times, so it "
            f"trains with AdamW at {chosen['lr']:.2g} (for ~{steps:,.0f} steps), cosine to {RECIPE['min_lr']:g}{batch}"
            f"{dropped}{decayed}{length} (the default's Muon memorises a small corpus; docs/performance.md); set "
            f"train.optimizer or train.lr to choose otherwise{f', {DECAY_KEY} the decay' if own_decay else ''}"
            f"{f', {DROPOUT_KEY} the dropout' if dropout else ''}")
    return dataclasses.replace(config, train=train), note


def _as_saved(config: Config, saved: dict[str, Any], own_batch: bool, own_length: bool, own_dropout: bool,
              own_decay: bool) -> Config:
    """``config`` with the small-corpus settings a resumed run's checkpoint was trained with, each
    section checked as a config file's would be: a crafted checkpoint's values are compared (and
    refused, naming them) when the run resumes, never adopted."""
    saved_train, saved_model = saved.get("train"), saved.get("model")
    if isinstance(saved_train, dict):
        keys = (*RECIPE, *(("batch_size",) if own_batch else ()), *(("max_epochs",) if own_length else ()),
                *(("weight_decay",) if own_decay else ()))
        kept = {k: saved_train[k] for k in keys if k in saved_train and saved_train[k] != getattr(config.train, k)}
        if kept:
            config = adopted(config, "train", kept, "the checkpoint's config")
    if own_dropout and isinstance(saved_model, dict) and saved_model.get("dropout", 0.0) != config.model.dropout:
        config = adopted(config, "model", {"dropout": saved_model.get("dropout")}, "the checkpoint's config")
    return config
