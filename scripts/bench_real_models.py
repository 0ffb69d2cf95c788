#!/usr/bin/env python
"""A real model's shape in lmtrain against transformers: SmolLM2-135M (random weights, its config).

    python scripts/bench_real_models.py [--steps 3] [--rounds 2] [--batch 2] [--seq 256] [--new-tokens 64] [--threads 2]

Builds ``LlamaForCausalLM`` from SmolLM2-135M's config (30 layers, width 576, 9 heads over 3
key/value heads, MLP 1536, vocabulary 49,152, tied, rms_norm_eps 1e-5, rope_theta 1e5) with random
weights, saves it with a small byte-level tokenizer, and loads it through ``model.init_from`` as a
user would. Then, in one process, at the same batch, sequence length and thread count:

- training tokens/s: lmtrain's step (``build_training``: forward, backward, clipping, AdamW; full
  fine-tuning and LoRA rank 8 on q, k, v, o) against transformers' forward + backward + AdamW
  (fused, the Trainer's default), in interleaved rounds;
- decoding tokens/s at batch 1: lmtrain's cached decoder (eager, and compiled ahead of time as
  ``lmtrain sample --compile`` does) against transformers' greedy ``generate``;
- the bound on batch-1 decoding in fp32: one matrix-vector product with every weight matrix, as a
  decoded token needs, timed alone (the model's bytes over the machine's memory bandwidth);
- the peak resident memory of loading the model for sampling (``--model``), in a fresh process.

Targets (issue 33): training >= 1.2x transformers, decoding >= 2x with --compile. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def make_model(directory: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).save_pretrained(directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    import pydoc_data.topics

    tokenizer.train_from_iterator(list(pydoc_data.topics.topics.values()),
                                  trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tokenizer.save(str(directory / "tokenizer.json"))


def tokens_per_second(step, tokens: int, steps: int) -> float:
    step()  # warm-up: allocator growth, first-call costs
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return tokens * steps / (time.perf_counter() - start)


def bench_training(directory: Path, args) -> dict:
    """Tokens/s of each training step, measured in ``args.rounds`` interleaved rounds (lmtrain full,
    LoRA, transformers; again), so that a drift in the machine's pace favours none; the mean."""
    import transformers

    from lmtrain.config import load_config
    from lmtrain.data import SyntheticBatches
    from lmtrain.pretrained import open_source, resolve
    from lmtrain.restore import Pretrained
    from lmtrain.schedule import Schedule, lr_at
    from lmtrain.step import build_training

    device = torch.device("cpu")
    tokens = args.batch * args.seq
    batches = SyntheticBatches(2048, args.batch, args.seq, device)
    steps = {}
    for name, extra in (("lmtrain full", []), ("lmtrain LoRA r8", ["train.lora_rank=8"])):
        config = resolve(load_config(None, [f"model.init_from={directory}", f"model.block_size={args.seq}",
                                            f"train.batch_size={args.batch}", "train.grad_accum=1",
                                            f"run.dir={directory}-run", *extra]))
        source = Pretrained(open_source(str(directory)))
        training = build_training(config, config.tokenizer.vocab_size, device, "fp32",
                                  restore=None if extra else source, base=source if extra else None)
        schedule, step = Schedule.of(config.train), iter(range(10_000))

        def run_step(training=training, schedule=schedule, step=step):
            i = next(step)
            training.runner.run(i, batches, lr_at(i, schedule))

        steps[name] = run_step
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
    # The fused kernel, as transformers' Trainer uses by default with torch >= 2.8 (adamw_torch_fused).
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=True)

    def hf_step():
        x, y = batches.get(0, 0)
        loss = hf(input_ids=x, labels=None).logits.float().reshape(-1, hf.config.vocab_size)
        loss = torch.nn.functional.cross_entropy(loss, y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps["transformers full"] = hf_step
    measured = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            measured[name].append(tokens_per_second(step, tokens, args.steps))
    return {name: sum(values) / len(values) for name, values in measured.items()}


def bench_decoding(directory: Path, args) -> dict:
    import transformers

    from lmtrain.generate import Decoder, SamplingParams, generate
    from lmtrain.inference import load_model

    loaded = load_model(directory)
    prompt = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, compiled in (("lmtrain eager", False), ("lmtrain --compile", True)):
        decoder = Decoder(loaded.model, 1, None, compile=compiled, length=16 + args.new_tokens + 1)  # as sample sizes it
        list(generate(loaded.model, prompt, 4, SamplingParams(temperature=0.0), None, None, decoder))  # warm-up
        start = time.perf_counter()
        list(generate(loaded.model, prompt, args.new_tokens, SamplingParams(temperature=0.0), None, None, decoder))
        out[name] = args.new_tokens / (time.perf_counter() - start)
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        hf.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        hf.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=0)
    out["transformers generate"] = args.new_tokens / (time.perf_counter() - start)
    return out


def decoding_bound(directory: Path) -> float:
    """Tokens/s if a token cost nothing but one fp32 matrix-vector product with each weight matrix of
    the model (every byte of the weights read once): what no batch-1 decoder of these weights beats."""
    from lmtrain.inference import load_model

    model = load_model(directory).model
    matrices = [p.detach() for p in model.parameters() if p.dim() == 2]
    vectors = {m.size(1): torch.randn(1, m.size(1)) for m in matrices}

    def read_all():
        for m in matrices:
            torch.mm(vectors[m.size(1)], m.t())

    for _ in range(3):
        read_all()
    start = time.perf_counter()
    for _ in range(10):
        read_all()
    return 10 / (time.perf_counter() - start)


def load_rss(directory: Path) -> float:
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak at fork.
    code = ("import re, sys; from pathlib import Path; from lmtrain.inference import load_model; "
            "load_model(Path(sys.argv[1])); "
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved training rounds (ABAB)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        directory = Path(tmp) / "smollm2-135m"
        make_model(directory)
        training = bench_training(directory, args)
        decoding = bench_decoding(directory, args)
        bound = decoding_bound(directory)
        rss = load_rss(directory)
    print(f"SmolLM2-135M shape, random weights; CPU, {args.threads} threads, batch {args.batch} x {args.seq}")
    for name, value in training.items():
        print(f"  train {name:22s} {value:10,.0f} tokens/s  ({value / training['transformers full']:.2f}x transformers)")
    for name, value in decoding.items():
        print(f"  decode {name:21s} {value:10,.1f} tokens/s  ({value / decoding['transformers generate']:.2f}x transformers)")
    print(f"  decode bound: every weight read once (fp32 matrix-vector products) {bound:10,.1f} tokens/s  "
          f"({bound / decoding['transformers generate']:.2f}x transformers)")
    print(f"  peak RSS of loading it (--model): {rss:,.0f} MB")
    print(json.dumps({"training_tokens_per_sec": training, "decoding_tokens_per_sec": decoding,
                      "decoding_bound_tokens_per_sec": bound, "load_peak_rss_mb": rss,
                      "threads": args.threads, "batch": args.batch, "seq": args.seq}))


if __name__ == "__main__":
    main()
