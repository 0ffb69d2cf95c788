#!/usr/bin/env python
"""One entry of the default-run speedrun: train a variant for a fixed wall-clock budget, report val bpb.

    python scripts/speedrun.py --name rope --set model.pos_embedding=rope [--minutes 3] [--config C]

Each variant trains on the embedded corpus for the same budget on this machine: the script first
times a few steps of the variant (through `lmtrain.step.build_training`, i.e. the real
training step), sets train.max_steps so that the whole schedule (warmup, decay) fits the budget,
and keeps train.max_minutes as a hard cap. Tokenizers and shards are cached per vocab size under
--workdir, so variants differ only in what they set. At the end the last checkpoint is scored on
the whole val split (`lmtrain eval`), and a line is appended to --log (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from lmtrain.config import load_config
from lmtrain.data import SyntheticBatches
from lmtrain.device import resolve_device
from lmtrain.step import build_training


def seconds_per_step(cfg, steps: int = 8) -> float:
    device = resolve_device("cpu")
    runner = build_training(cfg, cfg.tokenizer.vocab_size, device, "fp32").runner
    batches = SyntheticBatches(cfg.tokenizer.vocab_size, cfg.train.batch_size, cfg.model.block_size, device)
    for step in range(2):
        runner.run(step, batches)
    start = time.perf_counter()
    for step in range(2, 2 + steps):
        runner.run(step, batches)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--margin", type=float, default=0.88, help="share of the budget the step count plans for")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "speedrun")
    parser.add_argument("--log", type=Path, default=REPO / "runs" / "speedrun" / "log.jsonl")
    args = parser.parse_args()

    from lmtrain.evaluate import evaluate
    from lmtrain.shards import build_shards
    from lmtrain.tokenizer import train_tokenizer
    from lmtrain.train import train

    probe = load_config(args.config, args.sets)
    vocab_dir = args.workdir / f"prepared-v{probe.tokenizer.vocab_size}"
    if not (vocab_dir / "data" / "manifest.json").exists():
        prep = load_config(args.config, args.sets + [f"run.dir={vocab_dir}"])
        train_tokenizer(prep, force=True)
        build_shards(prep)

    step_seconds = seconds_per_step(probe)
    # Eval and checkpoint time come out of the budget too, and a real step (real data, logging)
    # runs a little slower than the probe's: plan for --margin of the budget (0.96 once; 0.88 on
    # a noisier machine, where 0.96 let train.max_minutes cut the decay short).
    max_steps = max(10, int(args.minutes * 60 * args.margin / step_seconds))
    run_dir = args.workdir / args.name
    shutil.rmtree(run_dir, ignore_errors=True)
    for part in ("tokenizer", "data"):
        shutil.copytree(vocab_dir / part, run_dir / part)
    sets = args.sets + [f"run.dir={run_dir}", f"train.max_steps={max_steps}", f"train.max_minutes={args.minutes}",
                        f"train.checkpoint_every={max_steps}", f"train.eval_every={max_steps}"]
    cfg = load_config(args.config, sets)
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    scored = evaluate(run_dir)
    entry = {"name": args.name, "sets": args.sets, "max_steps": max_steps, "steps": result.step,
             "stopped_by": result.stopped_by, "train_seconds": round(wall, 1),
             "tokens_per_sec": round(result.tokens_per_sec), "val_bpb": round(scored.bpb, 4),
             "val_loss": round(scored.loss, 4), "unigram_bpb": scored.unigram_bpb}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps(entry))


if __name__ == "__main__":
    main()
