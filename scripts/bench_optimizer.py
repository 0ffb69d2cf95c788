#!/usr/bin/env python
"""Tokens to a target loss: AdamW against Muon, same model, same data, same schedule shape.

    python scripts/bench_optimizer.py [--config configs/default.yaml] [--steps 240] [--set k=v ...]
                                      [--adamw-set k=v ...] [--muon-set k=v ...]

Trains the config with AdamW for --steps steps (its whole schedule: warmup, stable, decay) and
takes its final val loss on the whole val split as the target. Then trains it with Muon for
shorter runs (--fractions of --steps, each with its whole schedule laid out over its own length,
as a user who wants fewer tokens would run it), and finds, by interpolating the final losses
between the runs that bracket the target, how many tokens Muon needs to reach it. Ratio < 1: Muon
needs fewer tokens. --adamw-set and --muon-set apply to one optimiser's runs only, so that each
runs at its own best settings: above all `train.lr`, which under AdamW drives every parameter and
beside Muon only the embeddings, head, norms and biases. On the default model AdamW alone is best
near 6e-3 (3e-3 and 1e-2 lose) and the AdamW groups beside Muon at 2e-2 or more (docs/speedrun.md
round 14); the default config's own `train.lr` (2e-2) is Muon's, so give AdamW its own:

    python scripts/bench_optimizer.py --steps 560 --adamw-set train.lr=6e-3 --adamw-set train.min_lr=6e-4

Uses the speedrun's prepared data (tokenizer and shards per vocab size).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from lmtrain.config import load_config  # noqa: E402
from lmtrain.rundir import fork_run


def prepared(config: Path, sets: list[str], workdir: Path) -> Path:
    from lmtrain.prepare import build_shards, train_tokenizer

    probe = load_config(config, sets)
    directory = workdir / f"prepared-v{probe.tokenizer.vocab_size}"
    if not (directory / "data" / "manifest.json").exists():
        prep = load_config(config, sets + [f"run.dir={directory}"])
        train_tokenizer(prep, force=True)
        build_shards(prep)
    return directory


def run(config: Path, sets: list[str], source: Path, run_dir: Path, steps: int) -> dict:
    from lmtrain.evaluate import evaluate
    from lmtrain.train import train

    shutil.rmtree(run_dir, ignore_errors=True)
    fork_run(source, run_dir)
    cfg = load_config(config, sets + [f"run.dir={run_dir}", f"train.max_steps={steps}",
                                      f"train.checkpoint_every={steps}", f"train.eval_every={steps}"])
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    scored = evaluate(run_dir)
    return {"steps": steps, "tokens": result.tokens_seen, "seconds": round(seconds, 1),
            "tokens_per_sec": round(result.tokens_per_sec), "val_loss": scored.loss, "val_bpb": scored.bpb}


def tokens_to_reach(target: float, runs: list[dict]) -> float | None:
    """Tokens at which the loss-vs-tokens line through the runs crosses ``target`` (None if no
    run reaches it)."""
    runs = sorted(runs, key=lambda r: r["tokens"])
    if runs[0]["val_loss"] <= target:
        return float(runs[0]["tokens"])  # the shortest run already reaches it: an upper bound
    for a, b in zip(runs, runs[1:]):
        if b["val_loss"] <= target:
            share = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a["tokens"] + share * (b["tokens"] - a["tokens"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--adamw-set", dest="adamw_sets", action="append", default=[], help="for the AdamW run only")
    parser.add_argument("--muon-set", dest="muon_sets", action="append", default=[], help="for the Muon runs only")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--fractions", default="0.5,0.75,1.0")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "speedrun")
    args = parser.parse_args()
    source = prepared(args.config, args.sets, args.workdir)
    base = args.workdir / "optimizer-bench"
    adamw = run(args.config, args.sets + ["train.optimizer=adamw"] + args.adamw_sets, source, base / "adamw", args.steps)
    target = adamw["val_loss"]
    muon = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        steps = max(10, round(args.steps * fraction))
        muon.append(run(args.config, args.sets + ["train.optimizer=muon"] + args.muon_sets, source, base / f"muon-{steps}",
                        steps))
    needed = tokens_to_reach(target, muon)
    print(f"{'optimizer':<9} {'steps':>6} {'tokens':>10} {'tokens/s':>9} {'val loss':>9} {'val bpb':>8}")
    for name, r in [("adamw", adamw)] + [("muon", r) for r in muon]:
        print(f"{name:<9} {r['steps']:>6} {r['tokens']:>10,} {r['tokens_per_sec']:>9,} {r['val_loss']:>9.4f} "
              f"{r['val_bpb']:>8.4f}")
    ratio = needed / adamw["tokens"] if needed is not None else None
    print(f"target: AdamW's final val loss {target:.4f} after {adamw['tokens']:,} tokens; Muon reaches it after "
          + (f"{needed:,.0f} tokens ({ratio:.2f}x)" if needed is not None else "more tokens than it was given"))
    print(json.dumps({"sets": args.sets, "adamw_sets": args.adamw_sets, "muon_sets": args.muon_sets, "adamw": adamw,
                      "muon": muon, "target_loss": target, "muon_tokens_to_target": needed, "ratio": ratio}))


if __name__ == "__main__":
    main()
