#!/usr/bin/env python
"""Benchmark training throughput of a config: tokens/s, where the time goes, MFU, peak memory.

    python scripts/bench_train.py --config configs/default.yaml [--set k=v ...] [--steps 30]
                                  [--warmup 5] [--data RUN_DIR/data] [--split]

Runs the very step `lmtrain train` runs (`lmtrain.step.build_training`, the function the trainer
builds its model, optimiser, autocast, torch.compile and clipping with) for --steps steps after --warmup untimed ones, on synthetic
tokens (uniform over the vocabulary) or, with --data, on a run's real shards. No run directory
is needed.

MFU is model FLOPs (6N + attention, per token) times tokens/s over the device's peak: on a GPU
the dense bf16 peak from lmtrain's table (or --peak-tflops); on CPU the FLOP rate of a large fp32
`torch.matmul` measured in this process, so CPU MFU says how close the step is to the machine's
own best matmul.

--split adds a second timed pass that synchronises the device between phases to split the step
into data, forward+backward and optimiser (the main pass never synchronises inside a step).
--lock FILE holds an exclusive lock on FILE for the timed steps only: several benchmarks (one per
batch size, say) can then compile at the same time and still take their timings one at a time.
Prints a table and one JSON line with at least tokens_per_sec, mfu and peak_memory_mb.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import time
from pathlib import Path


import torch

from lmtrain.config import load_config
from lmtrain.data import SyntheticBatches
from lmtrain.device import memory_mb, peak_tflops, resolve_device, resolve_precision
from lmtrain.schedule import Schedule, lr_at
from lmtrain.step import StepRunner, build_training, tokens_per_step, uses_compile
from lmtrain.timing import timed


def cpu_matmul_tflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def profile_steps(runner: StepRunner, batches, steps, schedule: Schedule, device: torch.device, top: int = 25) -> None:
    """Print the ops that take the most time over ``steps`` (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in steps:
            runner.run(step, batches, lr_at(step, schedule))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


@contextlib.contextmanager
def exclusive(path: Path | None):
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", type=Path, default=None, help="a run's data/ directory (default: synthetic)")
    parser.add_argument("--vocab-size", type=int, default=None, help="synthetic vocab (default: tokenizer.vocab_size)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--split", action="store_true", help="also measure the per-phase split")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile N steps with torch.profiler and print the top ops")
    parser.add_argument("--lock", type=Path, default=None, help="time while holding an exclusive lock on this file")
    args = parser.parse_args()

    cfg = load_config(args.config, args.sets)
    tc = cfg.train
    device = resolve_device(tc.device, "train.device")
    precision = resolve_precision(tc.precision, device)
    if args.data is not None:
        from lmtrain.data import TokenWindows, TrainBatches
        from lmtrain.shards import read_manifest

        vocab = read_manifest(args.data).vocab_size
        batches = TrainBatches(TokenWindows(args.data, "train", cfg.model.block_size + 1), cfg.run.seed,
                               tc.batch_size, 0, 1, device)
    else:
        vocab = args.vocab_size or cfg.tokenizer.vocab_size
        batches = SyntheticBatches(vocab, tc.batch_size, cfg.model.block_size, device)

    training = build_training(cfg, vocab, device, precision)
    model, runner = training.model, training.runner
    schedule = Schedule.of(tc)

    def steps(first: int, count: int, timings: dict | None = None):
        for step in range(first, first + count):
            yield runner.run(step, batches, lr_at(step, schedule), timings)

    warmup_seconds = timed(device, lambda: list(steps(0, args.warmup)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timings: dict[str, float] = {}
    losses = []
    with exclusive(args.lock):
        # The steps are timed together, the device synchronised at both ends only (never inside a step).
        seconds = timed(device, lambda: losses.extend(loss for loss, _, _ in steps(args.warmup, args.steps)))
        final_loss = float(losses[-1])
        if args.split:
            list(steps(args.warmup + args.steps, args.steps, timings))
        if args.profile:
            profile_steps(runner, batches, range(10_000, 10_000 + args.profile), schedule, device)

    tokens_per_sec = tokens_per_step(cfg) * args.steps / seconds
    flops_per_token = model.flops_per_token()
    if device.type == "cpu":
        peak = args.peak_tflops or cpu_matmul_tflops()
        peak_source = "fp32 torch.matmul 2048^2 measured here"
    else:
        peak = peak_tflops(device, args.peak_tflops or tc.peak_tflops)
        peak_source = "table" if args.peak_tflops is None else "--peak-tflops"
    mfu = flops_per_token * tokens_per_sec / (peak * 1e12) if peak else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = {
        "config": str(args.config or "embedded default"), "overrides": args.sets, "device": device_name,
        "precision": precision, "compiled": uses_compile(tc, device),
        "params": model.num_params(), "batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
        "block_size": cfg.model.block_size, "steps": args.steps, "data": "real" if args.data else "synthetic",
        "tokens_per_sec": round(tokens_per_sec, 1), "step_ms": round(1000 * seconds / args.steps, 2),
        "flops_per_token": flops_per_token, "peak_tflops": peak, "peak_source": peak_source,
        "mfu": round(mfu, 4) if mfu is not None else None, "peak_memory_mb": round(memory_mb(device), 1),
        "warmup_seconds": round(warmup_seconds, 2), "final_loss": round(final_loss, 4),
    }
    if timings:
        total = sum(timings.values())
        report["time_split"] = {k: round(v / total, 4) for k, v in timings.items()}

    print(f"device {device_name}, {precision}, {model.num_params() / 1e6:.2f}M params, "
          f"batch {tc.batch_size} x accum {tc.grad_accum} x block {cfg.model.block_size}, {report['data']} data")
    rows = [("tokens/s", f"{tokens_per_sec:,.0f}"), ("step (ms)", f"{report['step_ms']:.1f}"),
            ("model FLOPs/token", f"{flops_per_token / 1e6:.2f} M"),
            ("peak TFLOP/s", f"{peak:.2f} ({peak_source})" if peak else "unknown"),
            ("MFU", f"{mfu:.1%}" if mfu is not None else "n/a"),
            ("peak memory (MB)", f"{report['peak_memory_mb']:,.0f}"),
            ("warmup/compile (s)", f"{warmup_seconds:.1f}")]
    for phase, share in report.get("time_split", {}).items():
        rows.append((f"time in {phase}", f"{share:.1%}"))
    for name, value in rows:
        print(f"  {name:<26}{value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
