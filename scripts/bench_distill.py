#!/usr/bin/env python
"""Distillation on the embedded corpus: the same student trained alone and distilled from a teacher.

    python scripts/bench_distill.py --teacher runs/speedrun/s-3x192-10 [--steps 300] [--alpha 0.5] [--temperature 1]

Both students have configs/default.yaml's shape and schedule over --steps steps (no time budget:
the same steps and batches for both), on the teacher run's tokenizer and shards. Prints, for each,
the tokens per second (the teacher's forward passes are the distilled run's extra cost) and the
val bpb on the whole val split (`lmtrain eval`), and the teacher's own val bpb.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lmtrain.rundir import fork_run

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="an lmtrain run directory (the teacher)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "distill")
    args = parser.parse_args()

    from lmtrain.config import load_config
    from lmtrain.evaluate import evaluate
    from lmtrain.train import train

    rows = {"teacher": {"val_bpb": round(evaluate(args.teacher).bpb, 4)}}
    for name, extra in (("alone", []), ("distilled", [f"train.distill_from={args.teacher}",
                                                      f"train.distill_alpha={args.alpha}",
                                                      f"train.distill_temperature={args.temperature}"])):
        run_dir = args.workdir / name
        shutil.rmtree(run_dir, ignore_errors=True)
        fork_run(args.teacher, run_dir)
        cfg = load_config(args.config, [f"run.dir={run_dir}", f"train.max_steps={args.steps}",
                                        f"train.checkpoint_every={args.steps}", f"train.eval_every={args.steps}"] + extra)
        result = train(cfg)
        rows[name] = {"steps": result.step, "tokens_per_sec": round(result.tokens_per_sec),
                      "val_bpb": round(evaluate(run_dir).bpb, 4)}
    rows["teacher_cost"] = round(rows["alone"]["tokens_per_sec"] / rows["distilled"]["tokens_per_sec"] - 1, 3)
    print(json.dumps({"alpha": args.alpha, "temperature": args.temperature, **rows}))


if __name__ == "__main__":
    main()
