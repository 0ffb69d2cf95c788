#!/usr/bin/env python
"""Benchmark generation: tokens/s with and without the key/value cache, at batch 1 and 8.

    python scripts/bench_sample.py --run runs/default          # a trained checkpoint
    python scripts/bench_sample.py --config configs/default.yaml [--set k=v ...]   # fresh weights

Greedy decoding (so both paths produce the same tokens) of --new-tokens tokens after a
--prompt-tokens prompt, through `lmtrain.generate` (what `lmtrain sample` runs), on the best
device. Tokens/s counts new tokens over all sequences of the batch. On CUDA the cached path is
timed twice: replaying the captured CUDA graph (what `lmtrain sample` does there) and eagerly;
the decoder is built (and its graph captured) before timing, as `lmtrain sample` builds it once
per run. --compile also times the cached path with the step compiled (`lmtrain sample --compile`:
AOTInductor on a CPU, torch.compile on CUDA), compilation outside the timing and reported on its own.

Past ``block_size`` the cached loop slides its window (keeping the last three quarters, then
re-prefilling); the "slide cost" columns time the cached loop (eager, as `lmtrain sample` decodes
on a CPU) over the tokens that fit in one window and over 4 windows' worth of tokens, so the
ratio is what sliding costs. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import torch

from lmtrain.generate import Decoder, SamplingParams, generate, generate_uncached


def load(args):
    from lmtrain.device import inference_amp_dtype, resolve_device, resolve_precision
    from lmtrain.step import build_model

    if args.run is not None:
        from lmtrain.inference import load_model

        loaded = load_model(args.run, args.checkpoint, args.device)
        return loaded.model, loaded.device, loaded.amp_dtype, f"{args.run} ({loaded.checkpoint.name})"
    from lmtrain.config import load_config

    cfg = load_config(args.config, args.sets)
    device = resolve_device(args.device, "--device")
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, cfg.tokenizer.vocab_size).to(device).eval()
    amp = inference_amp_dtype(resolve_precision(cfg.train.precision, device), device)
    return model, device, amp, f"{args.config or 'embedded default'} (fresh weights)"


def time_generation(loop, model, prompt, new_tokens, amp, **kw) -> float:
    from lmtrain.device import synchronize

    def sync() -> None:
        synchronize(prompt.device)

    params = SamplingParams(temperature=0.0)
    for _ in loop(model, prompt, min(new_tokens, 8), params, None, amp, **kw):  # warm up
        pass
    sync()
    start = time.perf_counter()
    produced = 0
    for _ in loop(model, prompt, new_tokens, params, None, amp, **kw):
        produced += 1
    sync()
    return produced * prompt.size(0) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--compile", action="store_true", help="also time the compiled step")
    args = parser.parse_args()

    model, device, amp, what = load(args)
    block = model.config.block_size
    new_tokens = args.new_tokens  # past block_size the cached loop slides, the uncached one crops
    on_cuda = device.type == "cuda"
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens), generator=g).to(device)
        row = {"batch": batch}
        if on_cuda:
            capture_start = time.perf_counter()
            decoder = Decoder(model, batch, amp, cuda_graph=True)
            row["graph_capture_seconds"] = round(time.perf_counter() - capture_start, 3)
            row["cached_tokens_per_sec"] = round(time_generation(generate, model, prompt, new_tokens, amp,
                                                                 decoder=decoder), 1)
            del decoder
            eager = Decoder(model, batch, amp, cuda_graph=False)
            row["cached_eager_tokens_per_sec"] = round(time_generation(generate, model, prompt, new_tokens, amp,
                                                                       decoder=eager), 1)
        else:
            row["cached_tokens_per_sec"] = round(time_generation(generate, model, prompt, new_tokens, amp), 1)
        row["uncached_tokens_per_sec"] = round(time_generation(generate_uncached, model, prompt, new_tokens, amp), 1)
        if args.compile:
            compile_start = time.perf_counter()  # CPU: compiled at construction; CUDA: on first use
            compiled = Decoder(model, batch, amp, compile=True)
            for _ in generate(model, prompt, 2, SamplingParams(temperature=0.0), None, amp, decoder=compiled):
                pass
            row["compile_seconds"] = round(time.perf_counter() - compile_start, 1)
            row["cached_compiled_tokens_per_sec"] = round(time_generation(generate, model, prompt, new_tokens, amp,
                                                                          decoder=compiled), 1)
        row["speedup"] = round(row["cached_tokens_per_sec"] / row["uncached_tokens_per_sec"], 2)
        within = block - args.prompt_tokens
        eager_kw = {"decoder": Decoder(model, batch, amp, cuda_graph=False)} if on_cuda else {}
        row["within_window_tokens_per_sec"] = round(max(
            time_generation(generate, model, prompt, within, amp, **eager_kw) for _ in range(3)), 1)
        row["sliding_tokens_per_sec"] = round(max(
            time_generation(generate, model, prompt, 4 * block, amp, **eager_kw) for _ in range(3)), 1)
        results.append(row)
    name = torch.cuda.get_device_name(device) if on_cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{what}: {model.num_params() / 1e6:.2f}M params, block {block}, {new_tokens} new tokens after "
          f"{args.prompt_tokens}, greedy, on {name}")
    cached_label = "cached+graph tok/s" if on_cuda else "cached tok/s"
    eager_col = f"  {'cached eager':>13}" if on_cuda else ""
    compiled_col = f"  {'cached compiled':>16}  {'speedup':>8}" if args.compile else ""
    print(f"  {'batch':>5}  {cached_label:>18}{eager_col}  {'uncached tok/s':>15}  {'speedup':>8}{compiled_col}"
          f"  {'in-window tok/s':>16}  {'sliding tok/s':>14}  {'slide cost':>10}")
    for r in results:
        eager = f"  {r['cached_eager_tokens_per_sec']:>13,.1f}" if on_cuda else ""
        compiled = ""
        if args.compile:
            ratio = r["cached_compiled_tokens_per_sec"] / r["uncached_tokens_per_sec"]
            compiled = f"  {r['cached_compiled_tokens_per_sec']:>16,.1f}  {ratio:>7.2f}x"
        cost = 1 - r["sliding_tokens_per_sec"] / r["within_window_tokens_per_sec"]
        print(f"  {r['batch']:>5}  {r['cached_tokens_per_sec']:>18,.1f}{eager}  {r['uncached_tokens_per_sec']:>15,.1f}  "
              f"{r['speedup']:>7.2f}x{compiled}  {r['within_window_tokens_per_sec']:>16,.1f}  "
              f"{r['sliding_tokens_per_sec']:>14,.1f}  {cost:>9.0%}")
    if args.compile:
        print("  compile time (s): " + ", ".join(f"batch {r['batch']} {r['compile_seconds']}" for r in results))
    print(json.dumps({"model": what, "device": name, "new_tokens": new_tokens, "results": results}))

if __name__ == "__main__":
    main()
