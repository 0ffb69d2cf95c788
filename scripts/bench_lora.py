#!/usr/bin/env python
"""LoRA against full fine-tuning: trainable parameters, memory, checkpoint size, val bpb.

    python scripts/bench_lora.py --base runs/speedrun/b-fit-10 [--steps 150] [--workdir runs/lora]

The base (an lmtrain run trained on Python's standard library: code) is fine-tuned on English
prose that ships with Python: the language reference topics of ``pydoc_data.topics``, cut into
paragraphs, every 8th topic held out as the validation corpus. Every variant trains the same
steps on the same batches from the base's weights; each runs in its own process, so its peak
resident memory (ru_maxrss) is its own. Prints one JSON line per variant: trained parameters,
checkpoint size, tokens/s, peak RSS, and val bpb on the held-out topics (`lmtrain eval`, whole
split); the "base" row is the base itself on that split (no fine-tuning).

At the default model's size the process's memory is mostly PyTorch itself, so ``--memory-shape``
(default 12x768, GPT-2 small's shape) also trains a few steps of a randomly initialised base of
that shape both ways (micro-batch 2 x 128, so that activations do not hide the rest), where the
gradients and AdamW's moments of 85M weights show.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lmtrain.rundir import fork_run

REPO = Path(__file__).resolve().parent.parent
ALL = "[q,k,v,o,gate,up,down]"


def variants(steps: int) -> dict[str, list[str]]:
    return {
        "base (no fine-tuning)": ["train.max_steps=1", "train.lr=1e-12", "train.min_lr=0", "train.warmup_steps=0",
                                  "train.weight_decay=0"],
        "full, lr 3e-4": ["train.lr=3e-4", "train.min_lr=3e-5"],
        "full, lr 1e-3": ["train.lr=1e-3", "train.min_lr=1e-4"],
        "lora r8 q,k,v,o, lr 2e-3": ["train.lora_rank=8", "train.lr=2e-3", "train.min_lr=2e-4"],
        "lora r8 all, lr 2e-3": ["train.lora_rank=8", f"train.lora_targets={ALL}", "train.lr=2e-3", "train.min_lr=2e-4"],
        "lora r8 all+norms, lr 5e-3": ["train.lora_rank=8", f"train.lora_targets={ALL}", "train.lora_train_norms=true",
                                       "train.lr=5e-3", "train.min_lr=5e-4"],
        "lora r8 all+norms, lr 1e-2": ["train.lora_rank=8", f"train.lora_targets={ALL}", "train.lora_train_norms=true",
                                       "train.lr=1e-2", "train.min_lr=1e-3"],
        "lora r32 all+norms, lr 1e-2": ["train.lora_rank=32", "train.lora_alpha=64", f"train.lora_targets={ALL}",
                                        "train.lora_train_norms=true", "train.lr=1e-2", "train.min_lr=1e-3"],
    }


def write_corpus(directory: Path) -> tuple[Path, Path]:
    from pydoc_data.topics import topics

    train, val = directory / "train", directory / "val"
    shutil.rmtree(directory, ignore_errors=True)
    train.mkdir(parents=True)
    val.mkdir()
    for i, name in enumerate(sorted(topics)):
        (val if i % 8 == 7 else train).joinpath(f"{name}.txt").write_text(topics[name], encoding="utf-8")
    return train, val


def common_sets(base: Path, train: Path, val: Path, steps: int) -> list[str]:
    return [f"model.init_from={base}", f"data.source={train}", f"data.val_source={val}", "data.sample_by=paragraph",
            f"train.max_steps={steps}", "train.warmup_steps=10", "train.schedule=cosine", "train.optimizer=adamw",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.max_minutes=null"]


def one(args: argparse.Namespace) -> None:
    """Train and evaluate one variant (in this process); print its row."""
    from lmtrain.checkpoint import read_weights
    from lmtrain.config import load_config
    from lmtrain.evaluate import evaluate
    from lmtrain.train import train

    cfg = load_config(args.config, json.loads(args.sets))
    result = train(cfg)
    # What the checkpoint holds is what trained: every weight, or a LoRA run's adapters (and norms).
    tensors, _ = read_weights(result.checkpoint / "model.safetensors")
    row = {"tokens_per_sec": round(result.tokens_per_sec), "trained_params": sum(t.numel() for t in tensors.values()),
           "checkpoint_mb": round(sum(f.stat().st_size for f in result.checkpoint.iterdir()) / 1e6, 3)}
    if not args.memory_only:
        row["val_bpb"] = round(evaluate(cfg.run_dir).bpb, 4)
    print(json.dumps(row), flush=True)


def run_variant(config: Path, sets: list[str], memory_only: bool = False) -> dict:
    """``one`` in a child process; its row plus the child's peak RSS."""
    cmd = [sys.executable, __file__, "--one", "--config", str(config), "--sets", json.dumps(sets)]
    if memory_only:
        cmd.append("--memory-only")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"variant failed ({sets}): exit {status}")
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    return row


def prepare(config: Path, run_dir: Path, sets: list[str]) -> None:
    """The run's tokenizer (the base's, copied: model.init_from) and shards of the prose corpus."""
    from lmtrain.config import load_config
    from lmtrain.pretrained import resolve
    from lmtrain.prepare import build_shards, train_tokenizer

    cfg = resolve(load_config(config, sets + [f"run.dir={run_dir}"]))
    train_tokenizer(cfg)
    build_shards(cfg)


def random_base(directory: Path, tokenizer_file: Path, n_layer: int, n_embd: int) -> Path:
    """A randomly initialised Llama-shaped base of that size, as a Hugging Face directory."""
    import torch
    import transformers

    from lmtrain.model import swiglu_hidden

    shutil.rmtree(directory, ignore_errors=True)
    vocab = json.loads(tokenizer_file.read_text())
    size = len(vocab["model"]["vocab"]) + sum(1 for t in vocab["added_tokens"] if t["id"] >= len(vocab["model"]["vocab"]))
    config = transformers.LlamaConfig(vocab_size=size, hidden_size=n_embd, intermediate_size=swiglu_hidden(n_embd),
                                      num_hidden_layers=n_layer, num_attention_heads=n_embd // 64,
                                      num_key_value_heads=n_embd // 64, max_position_embeddings=128,
                                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copyfile(tokenizer_file, directory / "tokenizer.json")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="an lmtrain run directory (the model to fine-tune)")
    parser.add_argument("--config", type=Path, help="the config to fine-tune with (default: the base run's own, whose "
                        "model.* keys agree with the base's architecture)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "lora")
    parser.add_argument("--memory-shape", default="12x768", help="LAYERSxWIDTH of the memory comparison; none skips it")
    parser.add_argument("--only", default="", help="run only the variants whose name contains this")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sets", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    if args.base is None:
        parser.error("--base is required")
    args.config = args.config or args.base / "config.yaml"

    train_dir, val_dir = write_corpus(args.workdir / "corpus")
    common = common_sets(args.base.resolve(), train_dir, val_dir, args.steps)
    prepared = args.workdir / "prepared"
    shutil.rmtree(prepared, ignore_errors=True)
    prepare(args.config, prepared, common)
    for name, extra in variants(args.steps).items():
        if args.only not in name:
            continue
        run_dir = args.workdir / re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
        shutil.rmtree(run_dir, ignore_errors=True)
        fork_run(prepared, run_dir)
        row = run_variant(args.config, common + extra + [f"run.dir={run_dir}"])
        print(json.dumps({"variant": name, **row}), flush=True)
    if args.memory_shape == "none":
        return
    n_layer, n_embd = (int(x) for x in args.memory_shape.split("x"))
    big = random_base(args.workdir / f"base-{args.memory_shape}", prepared / "tokenizer" / "tokenizer.json",
                      n_layer, n_embd)
    shape = [f"model.init_from={big}", f"model.n_layer={n_layer}", f"model.n_embd={n_embd}",
             f"model.n_head={n_embd // 64}", "train.max_steps=3", "train.warmup_steps=0", "train.batch_size=2",
             "train.eval_every=1000", "train.eval_batches=1", "train.checkpoint_every=1000"]
    for name, extra in (("full", []), ("lora r8 all", ["train.lora_rank=8", f"train.lora_targets={ALL}"])):
        run_dir = args.workdir / f"memory-{args.memory_shape}-{name.split()[0]}"
        shutil.rmtree(run_dir, ignore_errors=True)
        fork_run(prepared, run_dir)
        sets = common + shape + extra + [f"run.dir={run_dir}"]
        from lmtrain.config import load_config
        from lmtrain.memory import estimate
        from lmtrain.pretrained import resolve

        need = estimate(resolve(load_config(args.config, sets)), 4096, None, chunked_loss=True)
        row = run_variant(args.config, sets, memory_only=True)
        print(json.dumps({"variant": f"{args.memory_shape} {name}", **row,
                          "estimate": need.describe()}), flush=True)


if __name__ == "__main__":
    main()
