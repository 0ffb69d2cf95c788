"""Print docs/performance.md's memory table: lmtrain's estimate of the peak memory per GPU for each
GPT-2 config, on one GPU, under DDP, under FSDP over 2/4/8 GPUs and with activation checkpointing.

    python scripts/memory_table.py [--vocab 50257]

Arithmetic only (lmtrain/memory.py's ``estimate``, the line `lmtrain train` logs before it
starts), bf16 autocast, the compiled/standard loss; nothing is allocated.
"""

from __future__ import annotations

import argparse

import torch

from lmtrain.config import load_config
from lmtrain.memory import estimate

CONFIGS = ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args()
    gb = 1024 ** 3
    columns = [("one GPU", [], 1), ("selective AC", ["train.activation_checkpointing=selective"], 1),
               ("full AC", ["train.activation_checkpointing=full"], 1), ("DDP", [], 8),
               ("FSDP 2", ["train.parallel=fsdp"], 2), ("FSDP 4", ["train.parallel=fsdp"], 4),
               ("FSDP 8", ["train.parallel=fsdp"], 8),
               ("FSDP 8 + full AC", ["train.parallel=fsdp", "train.activation_checkpointing=full"], 8)]
    print("| config | params | micro-batch x accum | weights + grads + AdamW | activations | "
          + " | ".join(name for name, _, _ in columns) + " |")
    print("| --- | ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |")
    for name in CONFIGS:
        config = load_config(f"configs/{name}.yaml")
        base = estimate(config, args.vocab, torch.bfloat16)
        cells = []
        for _, sets, world in columns:
            need = estimate(load_config(f"configs/{name}.yaml", sets), args.vocab, torch.bfloat16, world)
            cells.append(f"{need.total / gb:.1f}")
        tc = config.train
        print(f"| {name} | {base.parameters / 1e6:.0f}M | {tc.batch_size} x {tc.grad_accum} | "
              f"{(base.weights + base.gradients + base.optimizer) / gb:.1f} | {base.activations / gb:.1f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
