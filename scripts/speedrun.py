#!/usr/bin/env python
"""One entry of the default-run speedrun: train a variant for a fixed wall-clock budget, report val bpb.

    python scripts/speedrun.py --name rope --set model.pos_embedding=rope [--minutes 3] [--config C]

Each variant trains on the embedded corpus for the same budget on this machine, with
train.max_minutes: lmtrain times real steps of the variant and fits the whole schedule (warmup,
decay) to the budget (lmtrain/budget.py; before it did, this script ran its own probe of synthetic
steps). Evaluation and checkpoints happen once, at the end. Tokenizers and shards are cached per
vocab size under --workdir (and tokenizer model), so variants differ only in what they set. At the end the last
checkpoint is scored on the whole val split (`lmtrain eval`), and a line is appended to --log
(JSON lines).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from lmtrain.config import load_config
from lmtrain.rundir import fork_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--as-configured", action="store_true",
                        help="keep the config's eval and checkpoint steps (else: once, at the end)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "speedrun")
    parser.add_argument("--log", type=Path, default=REPO / "runs" / "speedrun" / "log.jsonl")
    args = parser.parse_args()

    from lmtrain.evaluate import evaluate
    from lmtrain.prepare import build_shards, train_tokenizer
    from lmtrain.train import train

    wanted = load_config(args.config, args.sets)
    kind = "" if wanted.tokenizer.model == "bpe" else f"-{wanted.tokenizer.model}"
    vocab_dir = args.workdir / f"prepared-v{wanted.tokenizer.vocab_size}{kind}"
    if not (vocab_dir / "data" / "manifest.json").exists():
        prep = load_config(args.config, args.sets + [f"run.dir={vocab_dir}"])
        train_tokenizer(prep, force=True)
        build_shards(prep)

    run_dir = args.workdir / args.name
    shutil.rmtree(run_dir, ignore_errors=True)
    fork_run(vocab_dir, run_dir)
    sets = [f"train.max_minutes={args.minutes}"]
    if not args.as_configured:
        sets += ["train.checkpoint_every=1000000", "train.eval_every=1000000"]
    sets += args.sets + [f"run.dir={run_dir}"]
    cfg = load_config(args.config, sets)
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    scored = evaluate(run_dir)
    entry = {"name": args.name, "sets": args.sets, "max_steps": result.max_steps, "steps": result.step,
             "stopped_by": result.stopped_by, "train_seconds": round(wall, 1),
             "tokens_per_sec": round(result.tokens_per_sec), "val_bpb": round(scored.bpb, 4),
             "val_loss": round(scored.loss, 4), "unigram_bpb": scored.unigram_bpb, "minutes": args.minutes,
             "budget": result.budget, "eval_seconds": round(result.eval_seconds, 1),
             "checkpoint_seconds": round(result.checkpoint_seconds, 1)}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps(entry))


if __name__ == "__main__":
    main()
