"""Fingerprints of fixed-seed training runs: a refactor that changes no number leaves them equal.

Seven small CPU runs, each from a fresh run directory sharing one prepared tokenizer and shards:

    default      the embedded default config (Muon), shortened to 120 steps
    gpt2         a GPT-2-shaped model (learned positions, LayerNorm, GELU, biases) with AdamW,
                 dropout 0.1 and grad_accum 2
    lora         LoRA (rank 4) on top of the default run's weights
    distill      a smaller student distilled from the default run
    ddp          the default shape, 2 processes (torchrun, gloo)
    fsdp         the default shape, 2 processes, train.parallel fsdp
    budget       train.max_minutes with the budget's timing stubbed, so its decision is fixed

For each it prints the sha256 over every tensor of the final weights (names, dtypes, shapes and
bytes, in name order) and the sha256 of the full history (every loss, lr, grad norm and val figure,
as repr of the float). Run it on two commits and compare the lines:

    python scripts/same_numbers.py [--only default,gpt2] [--work DIR]

Use the interpreter whose ``lmtrain`` you want to fingerprint (PYTHONPATH=checkout picks a checkout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

RUNS = ("default", "gpt2", "lora", "distill", "ddp", "fsdp", "budget")
STEPS = {"max_steps": 120, "eval_every": 40, "checkpoint_every": 40, "log_every": 1, "eval_batches": 4}
TINY = {"max_steps": 40, "eval_every": 20, "checkpoint_every": 20, "log_every": 1, "eval_batches": 4,
        "batch_size": 8}

# Runs inside one process (in-process ones and each torchrun rank): train, then dump what is hashed.
RUNNER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sets = json.loads(sys.argv[2])
    stub = sys.argv[3] == "budget"
    from lmtrain.config import load_config
    config = load_config(Path(sys.argv[1]), sets)
    if stub:
        # The decision is a function of the measured costs and of the seconds spent so far: fix both.
        import lmtrain.budget as budget
        from lmtrain.budget import Costs
        fixed, real_plan = Costs(step=1.0, eval=1.0, checkpoint=0.5), budget.plan
        budget.plan = lambda minutes, costs, tc, step, spent, probe, owes=False: real_plan(
            minutes, fixed, tc, step, 0.0, 0.0, owes)
        budget.replan_due = lambda *args: False
        try:
            import lmtrain.train as train_mod
            train_mod.replan_due = budget.replan_due  # before Structure II the loop imported it
        except AttributeError:
            pass
    from lmtrain.train import train
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(sys.argv[4]).write_text(json.dumps({"history": [{k: repr(v) for k, v in h.items()}
                                                             for h in result.history],
                                                 "checkpoint": str(result.checkpoint),
                                                 "step": result.step}))
""")


def weights_sha(checkpoint: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def train_run(work: Path, name: str, base_config: Path, sets: dict, procs: int = 1) -> tuple[str, str, int]:
    run_dir = work / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir()
    for part in ("tokenizer", "data"):  # share the prepared tokenizer and shards
        shutil.copytree(work / "prepared" / part, run_dir / part)
    sets = {"run.dir": str(run_dir), **sets}
    out = work / f"{name}.json"
    runner = work / "runner.py"
    runner.write_text(RUNNER)
    args = [str(runner), str(base_config), json.dumps([f"{k}={v}" for k, v in sets.items()]), name, str(out)]
    if procs == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] + args
    done = subprocess.run(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{name}: training failed:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    history = hashlib.sha256(json.dumps(result["history"], sort_keys=True).encode()).hexdigest()
    return weights_sha(Path(result["checkpoint"])), history, result["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(RUNS))
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="same-numbers-"))
    work.mkdir(parents=True, exist_ok=True)
    import lmtrain

    default = Path(lmtrain.__file__).parent / "configs" / "default.yaml"
    prepared = work / "prepared"
    if not (prepared / "data").exists():
        subprocess.run([sys.executable, "-m", "lmtrain", "tokenize", "--config", str(default), "--set",
                        f"run.dir={prepared}"], check=True, stderr=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "lmtrain", "shard", "--config", str(default), "--set",
                        f"run.dir={prepared}"], check=True, stderr=subprocess.DEVNULL)
    steps = {f"train.{k}": v for k, v in STEPS.items()}
    tiny = {f"train.{k}": v for k, v in TINY.items()}
    plans = {
        "default": (steps, 1),
        "gpt2": ({**tiny, "model.pos_embedding": "learned", "model.norm": "layernorm", "model.mlp": "gelu",
                  "model.bias": "true", "model.dropout": 0.1, "model.n_head": 4, "model.n_embd": 64,
                  "train.optimizer": "adamw", "train.lr": 1e-3, "train.min_lr": 1e-4, "train.grad_accum": 2,
                  "train.schedule": "cosine"}, 1),
        "lora": ({**tiny, "model.init_from": str(work / "default"), "train.lora_rank": 4,
                  "train.optimizer": "adamw", "train.lr": 1e-3, "train.min_lr": 1e-4}, 1),
        "distill": ({**tiny, "model.n_layer": 1, "model.n_embd": 48, "train.distill_from": str(work / "default")}, 1),
        "ddp": (tiny, 2),
        "fsdp": ({**tiny, "train.parallel": "fsdp"}, 2),
        "budget": ({**tiny, "train.max_minutes": 2.0, "train.max_steps": 1000}, 1),
    }
    wanted = args.only.split(",")
    if any(n in wanted for n in ("lora", "distill")) and not (work / "default" / "checkpoints").exists():
        wanted = ["default"] + [n for n in wanted if n != "default"]
    for name in RUNS:
        if name not in wanted:
            continue
        sets, procs = plans[name]
        w, h, step = train_run(work, name, default, sets, procs)
        print(f"{name:8s} step {step:4d}  weights {w}  history {h}", flush=True)


if __name__ == "__main__":
    main()
