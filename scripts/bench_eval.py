#!/usr/bin/env python
"""Benchmark multiple-choice scoring (`lmtrain eval --tasks`): items per second.

    python scripts/bench_eval.py                                   # default model, fresh weights
    python scripts/bench_eval.py --config configs/gpt2-small.yaml  # another shape
    python scripts/bench_eval.py --run runs/default --tasks hellaswag_val.jsonl --limit 1000

Without --tasks, scores --items synthetic four-choice items whose token lengths follow
HellaSwag's in GPT-2 tokens (contexts 20-80, mean 50; endings 10-40, mean 25: assumed shapes, not
the data), tokenization excluded. With --run and --tasks, scores the real file the way
`lmtrain eval --tasks` does, tokenization included. Times two layouts on the same items:

  packed      what lmtrain runs: one sequence per item, the context once, the choices after it
  per choice  one sequence per (item, choice), the context repeated: what the harness runs

and checks that both give the same log-likelihoods. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lmtrain.tasks import EncodedItem, Row, encode_task, read_task, score_items


def load(args):
    from lmtrain.device import inference_amp_dtype, resolve_device, resolve_precision
    from lmtrain.step import build_model

    if args.run is not None:
        from lmtrain.inference import load_model

        loaded = load_model(args.run, args.checkpoint, args.device)
        return loaded, loaded.model, loaded.device, loaded.amp_dtype, f"{args.run} ({loaded.checkpoint.name})"
    from lmtrain.config import load_config

    cfg = load_config(args.config, args.sets)
    device = resolve_device(args.device, "--device")
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, cfg.tokenizer.vocab_size).to(device).eval()
    amp = inference_amp_dtype(resolve_precision(cfg.train.precision, device), device)
    return None, model, device, amp, f"{args.config or 'embedded default'} (fresh weights)"


def synthetic_items(n: int, vocab: int, block: int, seed: int = 0) -> list[EncodedItem]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        context = rng.integers(0, vocab, int(rng.integers(20, 81))).tolist()
        endings = [rng.integers(0, vocab, int(rng.integers(10, 41))).tolist() for _ in range(4)]
        context = context[max(0, len(context) + max(map(len, endings)) - 1 - block):]
        row = Row(context, endings, list(range(4)))
        items.append(EncodedItem(int(rng.integers(0, 4)), [len(e) for e in endings], [4 * len(e) for e in endings],
                                 [row], False))
    return items


def per_choice(items: list[EncodedItem]) -> list[EncodedItem]:
    """The same items, one row per choice (the context repeated)."""
    return [EncodedItem(i.label, i.tokens, i.utf8_bytes,
                        [Row(r.prefix, [c], [k]) for r in i.rows for c, k in zip(r.continuations, r.choices)],
                        i.truncated) for i in items]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--tasks", type=Path, default=None, help="a task file (needs --run)")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    loaded, model, device, amp, what = load(args)
    block = model.config.block_size
    if args.tasks is not None:
        if loaded is None:
            parser.error("--tasks needs --run (the task's text is tokenized with the run's tokenizer)")
        task = read_task(args.tasks, args.limit)
        encoded, tokenize_s = timed(lambda: encode_task(task, loaded.tokenizer, loaded.eot_id, block), device)
        items, source = encoded.items, f"{args.tasks} (first {len(encoded.items)} items)"
    else:
        items, tokenize_s = synthetic_items(args.items, model.config.vocab_size, block), 0.0
        source = f"{args.items} synthetic 4-choice items, HellaSwag-like lengths"
    score_items(model, items[: args.batch_size], device, amp, args.batch_size)  # warm-up
    packed, packed_s = timed(lambda: score_items(model, items, device, amp, args.batch_size), device)
    repeated, repeated_s = timed(lambda: score_items(model, per_choice(items), device, amp, args.batch_size), device)
    diff = max(float(np.abs(np.subtract(a.loglikelihoods, b.loglikelihoods)).max()) for a, b in zip(packed, repeated))
    n = len(items)
    tokens_packed = sum(r.length for i in items for r in i.rows)
    tokens_repeated = sum(r.length for i in per_choice(items) for r in i.rows)
    threads = torch.get_num_threads()
    print(f"model: {what}, {model.num_params() / 1e6:.2f}M parameters, block_size {block}, device {device}"
          f"{f', {threads} threads' if device.type == 'cpu' else ''}")
    print(f"items: {source}; batch {args.batch_size} sequences")
    print(f"{'layout':<12} {'tokens run':>11} {'seconds':>8} {'items/s':>8} {'1000 items':>11}")
    for name, tokens, seconds in (("packed", tokens_packed, packed_s), ("per choice", tokens_repeated, repeated_s)):
        print(f"{name:<12} {tokens:>11,} {seconds:>8.2f} {n / seconds:>8.1f} {1000 * seconds / n:>10.1f}s")
    if tokenize_s:
        print(f"tokenizing the file: {tokenize_s:.2f}s")
    print(f"packed is {repeated_s / packed_s:.2f}x faster; max |Δ log-likelihood| between layouts {diff:.1e}")
    print(json.dumps({"device": str(device), "threads": threads, "items": n, "params": model.num_params(),
                      "packed_s": packed_s, "per_choice_s": repeated_s, "items_per_s": n / packed_s,
                      "seconds_per_1000": 1000 * packed_s / n, "tokenize_s": tokenize_s,
                      "max_loglikelihood_diff": diff}))


if __name__ == "__main__":
    main()
