#!/usr/bin/env python
"""Benchmark `lmtrain shard`: throughput against the raw encoder, and memory against corpus size.

    python scripts/bench_shard.py [--source builtin:pystdlib] [--vocab-size 4096] [--repeat 8]

1. Trains a tokenizer on the source (not timed).
2. Throughput (best of --repeats alternating runs each): the raw `tokenizers` batch encoder on every document, already in memory (its ids
   taken out of the encodings, as any user of it must), versus
   the whole sharder (reading, encoding, writing, hashing) on the same corpus, in one process.
3. Memory: peak RSS of the sharder, each in a fresh subprocess, on the corpus and on the corpus
   written out `--repeat` times (a corpus that grows, so a memory leak would show).

Targets: sharder >= 0.9x the raw encoder; peak RSS at 8x within 1.25x of 1x.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from lmtrain.config import load_config
from lmtrain.corpus import iter_both_splits


def config_for(run_dir: Path, source: str, vocab_size: int):
    return load_config(None, [f"run.dir={run_dir}", f"data.source={source}",
                              f"tokenizer.vocab_size={vocab_size}", "data.val_fraction=0.02"])


def child(run_dir: str, source: str, vocab_size: int) -> None:
    """Shard one corpus and report this process's peak RSS (the parent reads stdout)."""
    from lmtrain.prepare import build_shards

    result = build_shards(config_for(Path(run_dir), source, vocab_size), force=True)
    tokens = sum(s["tokens"] for s in result.splits.values())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": tokens, "peak_rss_mb": peak_kb / 1024, "seconds": result.seconds}))


def write_corpus(docs: list[str], directory: Path, copies: int) -> None:
    directory.mkdir(parents=True)
    for c in range(copies):
        for i, text in enumerate(docs):
            # Make every copy distinct text so the hash split spreads copies like new documents.
            (directory / f"{c:02d}-{i:05d}.txt").write_text(f"# copy {c}\n{text}", encoding="utf-8")


def measure_rss(run_dir: Path, source: Path, vocab_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(source), str(vocab_size)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="builtin:pystdlib")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return

    from lmtrain.prepare import build_shards, train_tokenizer
    from lmtrain.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_shard-") as tmp:
        tmp = Path(tmp)
        cfg = config_for(tmp / "run", args.source, args.vocab_size)
        train_tokenizer(cfg)
        tokenizer = load_tokenizer(cfg.run_dir)
        docs = [doc.text for _, doc in iter_both_splits(cfg.data)]

        # The raw encoder's time includes taking the ids out of its results (`.ids`), which any
        # use of the encoder has to do; the sharder also reads, counts, writes and hashes.
        # Both run --repeats times, alternating, and each keeps its best time: the first call
        # of either pays for starting the encoder's thread pool, and this machine is noisy.
        raw_times, shard_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ids = [e.ids for e in tokenizer.encode_batch_fast(docs, add_special_tokens=False)]
            raw_times.append(time.perf_counter() - start)
            raw_tokens = sum(len(i) + 1 for i in ids)  # + the end-of-text per document
            del ids
            result = build_shards(cfg, force=True)
            shard_times.append(result.seconds)
        raw_seconds, shard_seconds = min(raw_times), min(shard_times)
        shard_tokens = sum(s["tokens"] for s in result.splits.values())
        assert shard_tokens == raw_tokens, (shard_tokens, raw_tokens)

        write_corpus(docs, tmp / "corpus1", 1)
        write_corpus(docs, tmp / f"corpus{args.repeat}", args.repeat)
        one = measure_rss(tmp / "run", tmp / "corpus1", args.vocab_size)
        many = measure_rss(tmp / "run", tmp / f"corpus{args.repeat}", args.vocab_size)

    raw_tps = raw_tokens / raw_seconds
    shard_tps = shard_tokens / shard_seconds
    report = {
        "source": args.source, "cpus": os.cpu_count(), "tokens": shard_tokens,
        "raw_encoder_tokens_per_sec": round(raw_tps), "sharder_tokens_per_sec": round(shard_tps),
        "throughput_ratio": round(shard_tps / raw_tps, 3),
        "peak_rss_mb_1x": round(one["peak_rss_mb"], 1),
        f"peak_rss_mb_{args.repeat}x": round(many["peak_rss_mb"], 1),
        "rss_ratio": round(many["peak_rss_mb"] / one["peak_rss_mb"], 3),
        f"tokens_{args.repeat}x": many["tokens"],
    }
    print(f"corpus: {args.source}, {shard_tokens:,} tokens, {os.cpu_count()} CPUs")
    print(f"{'':34}{'value':>14}  target")
    print(f"{'raw encoder tokens/s':34}{raw_tps:>14,.0f}")
    print(f"{'sharder tokens/s':34}{shard_tps:>14,.0f}")
    print(f"{'sharder / raw':34}{report['throughput_ratio']:>14.3f}  >= 0.9")
    print(f"{'peak RSS 1x (MB)':34}{one['peak_rss_mb']:>14.1f}")
    print(f"{f'peak RSS {args.repeat}x (MB)':34}{many['peak_rss_mb']:>14.1f}")
    print(f"{f'RSS {args.repeat}x / 1x':34}{report['rss_ratio']:>14.3f}  <= 1.25")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
