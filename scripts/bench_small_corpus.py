#!/usr/bin/env python
"""lmtrain against a plain transformers Trainer on small corpora, side by side, ABAB.

    python scripts/bench_small_corpus.py [--minutes 1.5] [--rounds 2] [--corpora prose,code]
                                         [--workdir runs/small-corpus] [--threads 2]

Corpora made here from what ships with Python: ``prose`` is the pydoc topics (0.47 MB of English,
cut into paragraphs), ``code`` about 1.1 MB of standard-library modules. Each gets one lmtrain run
directory (a 4,096-token BPE, the last ~10% of documents as val, via ``data.val_fraction``).

Per round, in this order (ABAB over rounds, one machine, one run at a time):

* **lmtrain**: the embedded default config, nothing set but ``data.source`` and
  ``train.max_minutes``; val bpb of its best checkpoint (what ``lmtrain eval`` reads), and of its
  last one (the "final within 0.5% of the best" check).
* **Trainer lr 1e-3** and **Trainer lr 3e-3**: ``LlamaForCausalLM`` of exactly lmtrain's default shape
  (2 x 96, 3 heads, SwiGLU, RoPE, RMSNorm, tied embeddings) on exactly lmtrain's token windows (the
  same sampler, seed and batch: 32 x 128), AdamW, cosine with 5% warmup, weight decay 0.1, fp32, for
  the same wall time: its step count is planned from a measured pace and the clock cuts it.

``--grid CORPUS:SHAPES:EPOCHS`` (repeatable) instead trains the runs ``lmtrain plan``'s
data-constrained rule is fitted on (``lmtrain.plan.Repetition``, points in
``lmtrain/scaling_points.json``): each shape for a fixed number of passes over the corpus, with
what a plan's config trains with on a small corpus (``lmtrain.small_data``: AdamW at
``recipe_lr`` for its steps, cosine to 0, 16 sequences a step, the default's early stopping and
best checkpoint), one JSON line each: non-embedding parameters, unique tokens, the tokens its
schedule was planned for (what the plan predicts from; early stopping may end it sooner), and the
val bpb of its best and last checkpoints (``lmtrain eval``'s). ``--fit FILE`` fits the constants
on such lines (``lmtrain.plan.fit_repetition``). The grid of 2026-12-07 was
``--grid prose:2x64,2x96,3x128,3x192:4,8,16 --grid code:2x64,2x96,3x128:4,16``.

Bits per byte are computed one way for all: the val split's token stream in windows of 129 tokens
overlapping by one, summed nats / the split's UTF-8 bytes / ln 2, by transformers on an HF model
(lmtrain's runs are exported first). The script checks that this equals ``lmtrain eval`` on the same
checkpoint (to 1e-4) before it reports anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

BLOCK, BATCH, SEED = 128, 32, 1337
HEAD = 32  # the default config's head size: the grid's shapes keep it


def make_corpora(root: Path) -> dict[str, Path]:
    import pydoc_data.topics

    prose = root / "prose" / "topics.txt"
    prose.parent.mkdir(parents=True, exist_ok=True)
    prose.write_text("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)),
                     encoding="utf-8")
    code = root / "code"
    code.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total > 1.1e6:
            break
        text = path.read_bytes().decode("utf-8", "replace")
        (code / (path.stem + ".txt")).write_text(text, encoding="utf-8")
        total += len(text.encode())
    return {"prose": prose, "code": code}


def prepare(workdir: Path, name: str, source: Path) -> Path:
    from lmtrain.config import load_config
    from lmtrain.prepare import build_shards, train_tokenizer

    run = workdir / name / "prepared"
    sets = [f"run.dir={run}", f"data.source={source}", "data.val_fraction=0.1"]
    if source.is_file():
        sets.append("data.sample_by=paragraph")
    cfg = load_config(None, sets)
    if not (run / "data" / "manifest.json").exists():
        train_tokenizer(cfg)
        build_shards(cfg)
    return run


def run_lmtrain(prepared: Path, target: Path, source: Path, minutes: float, extra: list[str] = ()) -> dict:
    from lmtrain.config import load_config
    from lmtrain.export import export
    from lmtrain.rundir import fork_run
    from lmtrain.train import train

    shutil.rmtree(target, ignore_errors=True)
    fork_run(prepared, target)
    sets = [f"run.dir={target}", f"data.source={source}", "data.val_fraction=0.1", f"train.max_minutes={minutes}"]
    if source.is_file():
        sets.append("data.sample_by=paragraph")
    result = train(load_config(None, sets + list(extra)))
    out = {}
    for which in ("best", "latest"):
        hf = target / f"hf-{which}"
        export(target, "hf", hf, which, force=True)
        out[which] = hf
    return {"steps": result.step, "tokens_per_s": result.tokens_per_sec, "best_step": result.best_step,
            "hf_best": out["best"], "hf_latest": out["latest"], "run": target}


def llama_like_lmtrain(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtrain.model import RMS_EPS, swiglu_hidden

    config = LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=swiglu_hidden(96), num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=BLOCK,
                         rms_norm_eps=RMS_EPS, rope_theta=10000.0, tie_word_embeddings=True,
                         attention_bias=False, mlp_bias=False)
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


class Windows(torch.utils.data.IterableDataset):
    """lmtrain's training windows, in lmtrain's order (``data.micro_batch_positions``)."""

    def __init__(self, run: Path, steps: int) -> None:
        from lmtrain.data import TokenWindows

        self.windows = TokenWindows(run / "data", "train", BLOCK + 1)
        self.steps = steps

    def __iter__(self):
        from lmtrain.data import micro_batch_positions

        for step in range(self.steps):
            for row in self.windows.windows(micro_batch_positions(self.windows, SEED, step, 0, BATCH)):
                ids = torch.from_numpy(row.astype(np.int64))
                yield {"input_ids": ids[:-1], "labels": ids[1:]}


def run_trainer(prepared: Path, target: Path, lr: float, minutes: float) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lmtrain.shards import read_manifest

    vocab = read_manifest(prepared / "data").vocab_size
    model = llama_like_lmtrain(vocab)
    # The pace, measured on this model and batch, plans the schedule's length for the wall time.
    ids = torch.randint(0, vocab, (BATCH, BLOCK + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    for i in range(8):
        if i == 3:
            start = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pace = (time.perf_counter() - start) / 5
    steps = max(10, int(minutes * 60 / pace))
    model = llama_like_lmtrain(vocab)

    class Clock(TrainerCallback):
        def __init__(self):
            self.start = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - self.start >= minutes * 60:
                control.should_training_stop = True

    class Shifted(Trainer):
        # The windows are already inputs and next-token targets: no shift inside the loss.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                     inputs["labels"].reshape(-1))
            return (loss, logits) if return_outputs else loss

    args = TrainingArguments(output_dir=str(target), max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.1,
                             logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=SEED, disable_tqdm=True)
    clock = Clock()
    trainer = Shifted(model=model, args=args, train_dataset=Windows(prepared, steps), callbacks=[clock])
    began = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - began
    return {"steps": out.global_step, "planned_steps": steps, "tokens_per_s": out.global_step * BATCH * BLOCK / seconds,
            "model": trainer.model}


@torch.no_grad()
def val_bpb(model, prepared: Path) -> float:
    """The one bits-per-byte computation: lmtrain eval's windows, scored by the HF model."""
    from lmtrain.shards import open_split, read_manifest

    manifest = read_manifest(prepared / "data")
    stream = np.concatenate(open_split(prepared / "data", "val")).astype(np.int64)
    model.eval()
    total = 0.0
    starts = list(range(0, len(stream) - 1, BLOCK))
    for i in range(0, len(starts), 16):
        for window in [stream[s:s + BLOCK + 1] for s in starts[i:i + 16]]:
            ids = torch.from_numpy(window)[None]
            logits = model(input_ids=ids[:, :-1]).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
    return total / manifest.splits["val"].utf8_bytes / math.log(2)


def run_grid_point(prepared: Path, target: Path, source: Path, layers: int, width: int, epochs: float) -> dict:
    """One run of the grid `lmtrain plan`'s repetition constants are fitted on (``--grid``)."""
    from lmtrain.config import load_config
    from lmtrain.evaluate import evaluate
    from lmtrain.rundir import fork_run
    from lmtrain.shards import read_manifest
    from lmtrain.small_data import SMALL_BATCH, recipe_lr
    from lmtrain.step import build_model
    from lmtrain.train import train

    manifest = read_manifest(prepared / "data")
    unique = manifest.splits["train"].tokens
    steps = max(1, round(epochs * unique / (SMALL_BATCH * BLOCK)))
    lr = recipe_lr(steps)
    shutil.rmtree(target, ignore_errors=True)
    fork_run(prepared, target)
    sets = [f"run.dir={target}", f"data.source={source}", "data.val_fraction=0.1",
            f"model.n_layer={layers}", f"model.n_embd={width}", f"model.n_head={width // HEAD}",
            f"train.max_steps={steps}", "train.optimizer=adamw", f"train.lr={lr}", "train.min_lr=0",
            "train.schedule=cosine", f"train.batch_size={SMALL_BATCH}"]
    if source.is_file():
        sets.append("data.sample_by=paragraph")
    config = load_config(None, sets)
    params = build_model(config.model, manifest.vocab_size).num_params(embeddings=False)
    result = train(config)
    return {"n_layer": layers, "n_embd": width, "params": params,
            "unique_tokens": unique, "planned_epochs": epochs, "planned_steps": steps, "steps": result.step,
            "best_step": result.best_step, "tokens": steps * SMALL_BATCH * BLOCK, "lr": lr,
            "tokens_per_s": round(result.tokens_per_sec),
            "val_bpb": round(evaluate(target, "best").bpb, 4), "val_bpb_last": round(evaluate(target, "latest").bpb, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--corpora", default="prose,code")
    parser.add_argument("--workdir", type=Path, default=Path("runs/small-corpus"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="a config override for the lmtrain runs "
                        "(repeatable; the default run sets none)")
    parser.add_argument("--lmtrain-only", action="store_true", help="skip the Trainer runs")
    parser.add_argument("--grid", action="append", default=[], metavar="CORPUS:SHAPES:EPOCHS",
                        help="train the plan's fitting grid instead, e.g. prose:2x64,2x96:4,16 (repeatable)")
    parser.add_argument("--fit", type=Path, default=None, help="fit the plan's repetition constants on these lines")
    args = parser.parse_args()
    if args.fit is not None:
        from dataclasses import asdict

        from lmtrain.plan import ScalingRule, fit_repetition

        points = [json.loads(line) for line in args.fit.read_text().splitlines() if line.startswith("{")]
        print(json.dumps(asdict(fit_repetition(points, ScalingRule.ours("adamw")))))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.grid:
        corpora = make_corpora(args.workdir / "corpora")
        for item in args.grid:
            name, shapes, epochs = item.split(":")
            prepared = prepare(args.workdir, name, corpora[name])
            for shape in shapes.split(","):
                layers, width = (int(v) for v in shape.split("x"))
                for passes in (float(e) for e in epochs.split(",")):
                    target = args.workdir / name / f"fit-{layers}x{width}-{passes:g}ep"
                    line = run_grid_point(prepared, target, corpora[name], layers, width, passes)
                    print(json.dumps({"corpus": name, **line}), flush=True)
        return
    from transformers import AutoModelForCausalLM

    from lmtrain.evaluate import evaluate

    corpora = make_corpora(args.workdir / "corpora")
    for name in args.corpora.split(","):
        prepared = prepare(args.workdir, name, corpora[name])
        for round_ in range(args.rounds):
            lm = run_lmtrain(prepared, args.workdir / name / f"lmtrain-{round_}", corpora[name], args.minutes, args.set)
            best_model = AutoModelForCausalLM.from_pretrained(lm["hf_best"], dtype=torch.float32)
            best = val_bpb(best_model, prepared)
            check = evaluate(lm["run"], "best").bpb
            # lmtrain eval scores its own val split (the same stream): the computations must agree.
            assert abs(best - check) < 1e-3, (best, check)
            last = val_bpb(AutoModelForCausalLM.from_pretrained(lm["hf_latest"], dtype=torch.float32), prepared)
            label = "lmtrain " + (" ".join(args.set) if args.set else "default")
            print(json.dumps({"corpus": name, "round": round_, "run": label, "minutes": args.minutes,
                              "steps": lm["steps"], "best_step": lm["best_step"],
                              "tokens_per_s": round(lm["tokens_per_s"]), "val_bpb_best": round(best, 4),
                              "val_bpb_final": round(last, 4), "lmtrain_eval_bpb": round(check, 4)}), flush=True)
            for lr in () if args.lmtrain_only else (1e-3, 3e-3):
                hf = run_trainer(prepared, args.workdir / name / f"trainer-{lr:g}-{round_}", lr, args.minutes)
                print(json.dumps({"corpus": name, "round": round_, "run": f"Trainer lr {lr:g}", "minutes": args.minutes,
                                  "steps": hf["steps"], "planned_steps": hf["planned_steps"],
                                  "tokens_per_s": round(hf["tokens_per_s"]),
                                  "val_bpb": round(val_bpb(hf["model"], prepared), 4)}), flush=True)


if __name__ == "__main__":
    main()
