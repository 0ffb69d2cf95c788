#!/usr/bin/env python
"""A training step with dropout on a CPU: PyTorch's dropout against lmtrain's (``GPT.drop_explicitly``).

    python scripts/bench_dropout.py [--vocab 1024] [--repeats 7] [--threads 2]

The small-corpus model (the embedded default config's: 2 x 96, rope, RMSNorm, SwiGLU, tied, block
128) takes AdamW steps on
16 x 128 random tokens with the chunked loss, as `lmtrain train` does on a CPU, in three
variants: no dropout, dropout 0.1 with PyTorch's ``nn.Dropout`` and SDPA's ``dropout_p`` (its
CPU math fallback), and dropout 0.1 with lmtrain's masks and attention written out. The three
are timed in turn, ``--repeats`` times 15 steps each, so a machine whose speed drifts slows all
three alike; each row prints the median, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from lmtrain.config import ModelConfig, load_config
from lmtrain.loss import chunked_cross_entropy
from lmtrain.step import build_model

STEPS_PER_REPEAT, BATCH = 15, 16


def step_fn(default: ModelConfig, vocab: int, dropout: float, explicit: bool):
    """One training step of the small-corpus model, warmed up."""
    torch.manual_seed(0)
    shape = dataclasses.replace(default, dropout=dropout)
    model = build_model(shape, vocab).train()
    model.drop_explicitly(explicit)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x, y = (torch.randint(0, vocab, (BATCH, shape.block_size)) for _ in range(2))

    def step() -> None:
        _, loss = model(x, y, loss_fn=chunked_cross_entropy)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = load_config(None).model
    variants = {"no dropout": step_fn(default, args.vocab, 0.0, False),
                "dropout 0.1, PyTorch's": step_fn(default, args.vocab, 0.1, False),
                "dropout 0.1, lmtrain's": step_fn(default, args.vocab, 0.1, True)}
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(STEPS_PER_REPEAT):
                step()
            seconds[name].append((time.perf_counter() - start) / STEPS_PER_REPEAT)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    for name, median in medians.items():
        print(f"{name:24s} {median * 1000:6.1f} ms a step  {BATCH * default.block_size / median:9,.0f} tokens/s  "
              f"(vocabulary {args.vocab:,}, {args.threads} threads)")
    print(json.dumps({"vocab": args.vocab, "threads": args.threads,
                      "ms_per_step": {name: round(m * 1000, 1) for name, m in medians.items()},
                      "speedup": round(medians["dropout 0.1, PyTorch's"] / medians["dropout 0.1, lmtrain's"], 2)}))


if __name__ == "__main__":
    main()
