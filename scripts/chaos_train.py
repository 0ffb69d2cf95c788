#!/usr/bin/env python
"""Fault injection: SIGKILL lmtrain at random moments, restart it, and check nothing was lost.

    python scripts/chaos_train.py [--kills 25] [--stage train|shard|tokenize|export|plan|all] [--seed 0]
                                  [--set train.optimizer=muon]

train:    runs `lmtrain train` on a tiny config that checkpoints every step (so kills land inside
          checkpoint writes too), kills it at random moments, restarts it, and repeats until the
          run completes. After every kill, `latest` and `best` must name whole checkpoints that
          load. Before about half the kills a second `lmtrain train` on the same run directory is
          launched while the first one is paused mid-run: it must be refused (exit 2, naming the
          first's PID) and change nothing. At the end the weights must be bit-identical to an
          uninterrupted run.
shard:    the same for `lmtrain shard --force` (many small shards): every rerun after a kill must
          leave either the previous complete shard set or none, and the final shards must be
          byte-identical to a clean build.
tokenize: the same for `lmtrain tokenize --force`: tokenizer.json is always absent or whole,
          and the final one is identical to a clean build.
export:   `lmtrain export --force` of a trained run, to an hf directory and a GGUF file, killed at
          random moments beside a user's files (`model.tmp-notes/`, `model.gguf.tmp-final`,
          `thesis.tex`): after every kill the export is absent or whole and byte-identical to a
          clean one, and the user's files are untouched; a final export cleans what the killed
          ones left.
plan:     `lmtrain plan --out PLAN --force`, killed the same way: PLAN is absent or a whole config.

Prints a table and one JSON line; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmtrain.rundir import fork_run

REPO = Path(__file__).resolve().parent.parent

TRAIN_SETS = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.batch_size=4", "train.warmup_steps=5", "train.lr=3e-3", "train.min_lr=3e-4",
    "train.eval_every=5", "train.eval_batches=1", "train.checkpoint_every=1", "train.keep_checkpoints=2",
    "train.log_every=1",
]


def base_sets(run_dir: Path, documents: int, shard_tokens: int) -> list[str]:
    return [f"run.dir={run_dir}", "data.source=builtin:pystdlib", f"data.max_documents={documents}",
            "data.val_fraction=0.2", "tokenizer.vocab_size=300", f"shard.shard_tokens={shard_tokens}"]


def lmtrain(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lmtrain", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def sets_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def run_to_end(*args: str) -> None:
    proc = lmtrain(*args)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"lmtrain {' '.join(args)} failed:\n{err}")


def kill_after(proc: subprocess.Popen, started: callable, delay: float, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``started()`` is true; False if it finished first."""
    deadline = time.time() + timeout
    while not started() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    end = time.time() + delay
    while time.time() < end and proc.poll() is None:
        time.sleep(0.005)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def chaos_train(workdir: Path, kills: int, rng: random.Random, max_steps: int = 1000,
                extra: tuple[str, ...] = ()) -> dict:
    from safetensors.torch import load_file

    from lmtrain.checkpoint import load_checkpoint, load_optimizer_state, resolve_checkpoint
    from lmtrain.config import load_config
    from lmtrain.prepare import build_shards, train_tokenizer

    prepared = workdir / "prepared"
    cfg = load_config(None, base_sets(prepared, 80, 1 << 16))
    train_tokenizer(cfg)
    build_shards(cfg)

    def fresh(name: str) -> tuple[Path, list[str]]:
        run = workdir / name
        fork_run(prepared, run)
        return run, base_sets(run, 80, 1 << 16) + TRAIN_SETS + [f"train.max_steps={max_steps}", *extra]

    # The reference runs exactly as the chaos runs do (a subprocess, the same thread count):
    # bit-identity is only promised for the same arithmetic.
    reference_dir, reference_sets = fresh("reference")
    run_to_end("train", *sets_args(reference_sets))

    run_dir, sets = fresh("chaos")
    ckpts = run_dir / "checkpoints"
    log = run_dir / "train.log"
    survived = during_write = recomputed = restarts = second_writers = 0
    problems: list[str] = []

    def last_logged_step() -> int:
        if not log.exists():
            return 0
        steps = [int(line.split("step ")[1].split(":")[0]) for line in log.read_text().splitlines()
                 if ": loss " in line]
        return max(steps, default=0)

    while True:
        proc = lmtrain("train", *sets_args(sets))
        restarts += 1
        if survived >= kills:
            _, err = proc.communicate()
            if proc.returncode != 0:
                problems.append(f"final run failed: {err[-500:]}")
            break
        before = last_logged_step()
        if rng.random() < 0.5:
            # A second writer (a job launched twice, a scheduler restarting a job that still runs).
            deadline = time.time() + 120
            while last_logged_step() <= before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            # Paused wherever it is (inside a checkpoint write, maybe), the first trainer still
            # holds the lock, and makes no progress while the second one starts up: the run does
            # not finish before every kill has happened.
            running = proc.poll() is None
            if running:
                proc.send_signal(signal.SIGSTOP)
            # Stopped after its last checkpoint, on its way out, the first may no longer hold the
            # run: a second writer then finds the training complete and rightly exits 0.
            complete = (ckpts / "latest").exists() and (ckpts / "latest").read_text().strip() == f"step-{max_steps:08d}"
            try:
                second = lmtrain("train", *sets_args(sets))
                _, second_err = second.communicate()
            finally:
                if running:
                    proc.send_signal(signal.SIGCONT)
            if running and not complete:  # the first was alive and training: the second must have been refused
                second_writers += 1
                if second.returncode != 2 or f"in use by `lmtrain train` (pid {proc.pid}" not in second_err:
                    problems.append(f"a second writer was not refused (exit {second.returncode}): "
                                    f"{second_err.strip()[-300:]}")
        killed = kill_after(proc, lambda: last_logged_step() > before, rng.uniform(0.0, 0.6))
        if not killed:
            if proc.returncode != 0:
                problems.append(f"run exited {proc.returncode}: {proc.stderr.read()[-500:]}")
            break
        survived += 1
        if any(".tmp-" in p.name for p in ckpts.iterdir()) if ckpts.exists() else False:
            during_write += 1
        reached = last_logged_step()
        resume_step = 0
        for pointer in ("latest", "best"):
            if not (ckpts / pointer).exists():
                continue
            try:
                path = resolve_checkpoint(ckpts, pointer)
                loaded = load_checkpoint(path)
                load_optimizer_state(path)
                if pointer == "latest":
                    resume_step = int(loaded.state["step"])
            except Exception as exc:  # any failure here is what this script exists to catch
                problems.append(f"after kill {survived}: {pointer} is broken: {exc}")
        recomputed += max(0, reached - resume_step)

    final = load_file(str(ckpts / (ckpts / "latest").read_text().strip() / "model.safetensors"))
    expected = load_file(str(reference_dir / "checkpoints" / f"step-{max_steps:08d}" / "model.safetensors"))
    identical = final.keys() == expected.keys() and all((final[k] == expected[k]).all() for k in final)
    if not identical:
        problems.append("final weights differ from the uninterrupted run")
    return {"stage": "train", "kills": survived, "survived": survived if not problems else None,
            "kills_during_checkpoint_writes": during_write, "steps_recomputed": recomputed,
            "second_writers_refused": second_writers if not problems else None,
            "restarts": restarts, "identical": bool(identical), "problems": problems}


# ---------------------------------------------------------------------------------------------
# shard and tokenize
# ---------------------------------------------------------------------------------------------


def chaos_shard(workdir: Path, kills: int, rng: random.Random, documents: int = 400) -> dict:
    from lmtrain.config import load_config
    from lmtrain.prepare import build_shards
    from lmtrain.shards import verify_shards
    from lmtrain.prepare import train_tokenizer

    reference = workdir / "shard-reference"
    cfg = load_config(None, base_sets(reference, documents, 4096))
    train_tokenizer(cfg)
    build_shards(cfg)
    run = workdir / "shard-chaos"
    shutil.copytree(reference / "tokenizer", run / "tokenizer")
    sets = base_sets(run, documents, 4096)
    survived, problems = 0, []
    data = run / "data"
    while survived < kills:
        proc = lmtrain("shard", "--force", *sets_args(sets))
        staging_seen = lambda: any(p.name.startswith("data.tmp-") for p in run.iterdir())  # noqa: E731
        if not kill_after(proc, staging_seen, rng.uniform(0.0, 1.0)):
            continue  # finished before the kill: just go again
        survived += 1
        if (data / "manifest.json").exists():
            try:
                verify_shards(data)
            except Exception as exc:
                problems.append(f"after kill {survived}: data/ looks whole but is not: {exc}")
    run_to_end("shard", *sets_args(sets))
    names = sorted(p.name for p in (reference / "data").iterdir())
    identical = names == sorted(p.name for p in data.iterdir()) and all(
        (reference / "data" / n).read_bytes() == (data / n).read_bytes() for n in names)
    if not identical:
        problems.append("final shards differ from a clean build")
    return {"stage": "shard", "kills": survived, "survived": survived if not problems else None,
            "identical": identical, "problems": problems}


def chaos_tokenize(workdir: Path, kills: int, rng: random.Random, documents: int = 400) -> dict:
    from tokenizers import Tokenizer

    from lmtrain.config import load_config
    from lmtrain.prepare import train_tokenizer

    reference = workdir / "tok-reference"
    train_tokenizer(load_config(None, base_sets(reference, documents, 4096)))
    run = workdir / "tok-chaos"
    sets = base_sets(run, documents, 4096)
    path = run / "tokenizer" / "tokenizer.json"
    survived, problems = 0, []
    while survived < kills:
        proc = lmtrain("tokenize", "--force", *sets_args(sets))
        if not kill_after(proc, lambda: True, rng.uniform(1.0, 3.0)):
            continue
        survived += 1
        if path.exists():
            try:
                Tokenizer.from_file(str(path))
            except Exception as exc:
                problems.append(f"after kill {survived}: tokenizer.json is broken: {exc}")
    run_to_end("tokenize", "--force", *sets_args(sets))
    identical = path.read_bytes() == (reference / "tokenizer" / "tokenizer.json").read_bytes()
    if not identical:
        problems.append("final tokenizer differs from a clean build")
    return {"stage": "tokenize", "kills": survived, "survived": survived if not problems else None,
            "identical": identical, "problems": problems}


# ---------------------------------------------------------------------------------------------
# export and plan
# ---------------------------------------------------------------------------------------------


def _user_files(root: Path) -> dict[str, bytes]:
    """A user's files beside the outputs, under names that look like lmtrain's leftovers."""
    files = {"model.tmp-notes/notes.md": b"mine", "model.gguf.tmp-final": b"mine too", "thesis.tex": b"years"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def chaos_export(workdir: Path, kills: int, rng: random.Random) -> dict:
    from lmtrain.config import load_config
    from lmtrain.prepare import build_shards, train_tokenizer

    run = workdir / "run"
    sets = base_sets(run, 80, 1 << 16) + TRAIN_SETS + ["train.max_steps=6", "model.pos_embedding=rope",
                                                       "model.norm=rmsnorm", "model.mlp=swiglu"]
    cfg = load_config(None, sets)
    train_tokenizer(cfg)
    build_shards(cfg)
    run_to_end("train", *sets_args(sets))
    outputs = workdir / "outputs"
    outputs.mkdir()
    user = _user_files(outputs)
    targets = {"hf": outputs / "model", "gguf": outputs / "model.gguf"}
    reference = {}
    for fmt, out in targets.items():  # a clean export of each, elsewhere: what a whole one holds
        clean = workdir / f"clean-{out.name}"
        run_to_end("export", "--run", str(run), "--format", fmt, "--out", str(clean))
        reference[fmt] = _tree(clean) if fmt == "hf" else clean.read_bytes()
        run_to_end("export", "--run", str(run), "--format", fmt, "--out", str(out))

    def whole(fmt: str, out: Path) -> bool:
        if not out.exists():
            return True
        return (_tree(out) if fmt == "hf" else out.read_bytes()) == reference[fmt]

    survived, problems = 0, []
    while survived < kills:
        fmt = rng.choice(list(targets))
        proc = lmtrain("export", "--run", str(run), "--format", fmt, "--out", str(targets[fmt]), "--force")
        if not kill_after(proc, lambda: True, rng.uniform(0.3, 4.0)):
            if proc.returncode != 0:
                problems.append(f"an export failed: {proc.stderr.read()[-300:]}")
            continue
        survived += 1
        if not whole(fmt, targets[fmt]):
            problems.append(f"after kill {survived}: {targets[fmt].name} is there but not whole")
        if any((outputs / name).read_bytes() != data for name, data in user.items()):
            problems.append(f"after kill {survived}: the user's files changed")
    for fmt, out in targets.items():
        run_to_end("export", "--run", str(run), "--format", fmt, "--out", str(out), "--force")
        if not out.exists() or not whole(fmt, out):
            problems.append(f"the final {fmt} export is missing or differs from a clean one")
    left = sorted(p.name for p in outputs.iterdir() if p.name not in {"model", "model.gguf", "model.tmp-notes",
                                                                       "model.gguf.tmp-final", "thesis.tex"})
    if left:
        problems.append(f"leftovers after a complete export: {left}")
    if any((outputs / name).read_bytes() != data for name, data in user.items()):
        problems.append("the user's files changed")
    return {"stage": "export", "kills": survived, "survived": survived if not problems else None,
            "identical": not problems, "problems": problems}


def chaos_plan(workdir: Path, kills: int, rng: random.Random) -> dict:
    import yaml

    config = workdir / "config.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
                                      "train": {"batch_size": 4, "warmup_steps": 2, "eval_batches": 1}}))
    user = _user_files(workdir)
    out = workdir / "plan.yaml"
    survived, problems = 0, []
    while survived < kills:
        proc = lmtrain("plan", "--minutes", "0.5", "--config", str(config), "--out", str(out), "--force")
        if not kill_after(proc, lambda: True, rng.uniform(2.0, 12.0), timeout=300):
            continue
        survived += 1
        if out.exists():
            try:
                yaml.safe_load(out.read_text())["model"]["n_layer"]
            except Exception as exc:
                problems.append(f"after kill {survived}: plan.yaml is there but not whole ({exc})")
        if any((workdir / name).read_bytes() != data for name, data in user.items()):
            problems.append(f"after kill {survived}: the user's files changed")
    return {"stage": "plan", "kills": survived, "survived": survived if not problems else None,
            "identical": not problems, "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--stage", choices=["train", "shard", "tokenize", "export", "plan", "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="train stage: an extra config override, e.g. train.optimizer=muon")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    stages = ["train", "shard", "tokenize", "export", "plan"] if args.stage == "all" else [args.stage]
    runners = {"train": lambda *a: chaos_train(*a, extra=tuple(args.sets)), "shard": chaos_shard,
               "tokenize": chaos_tokenize, "export": chaos_export, "plan": chaos_plan}
    reports = []
    with tempfile.TemporaryDirectory(prefix="lmtrain-chaos-") as tmp:
        for stage in stages:
            start = time.time()
            report = runners[stage](Path(tmp) / stage, args.kills, rng)
            report["seconds"] = round(time.time() - start, 1)
            reports.append(report)
    print(f"{'stage':10}{'kills':>7}{'survived':>10}{'identical':>11}  notes")
    for r in reports:
        notes = ""
        if r["stage"] == "train":
            notes = (f"{r['kills_during_checkpoint_writes']} kills inside checkpoint writes, "
                     f"{r['steps_recomputed']} steps recomputed, "
                     f"{r['second_writers_refused']} second writers refused")
        if r["problems"]:
            notes += "; PROBLEMS: " + " | ".join(r["problems"])
        print(f"{r['stage']:10}{r['kills']:>7}{str(r['survived']):>10}{str(r['identical']):>11}  {notes}")
    print(json.dumps(reports))
    sys.exit(1 if any(r["problems"] for r in reports) else 0)


if __name__ == "__main__":
    main()
