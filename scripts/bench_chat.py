#!/usr/bin/env python
"""Chat fine-tuning and serving, measured: packed against padded conversation rows, and `lmtrain
serve`'s throughput at 1, 4 and 8 concurrent clients against 8 in a row.

    python scripts/bench_chat.py [--steps 200] [--workdir runs/bench-chat] [--threads 2]

The data is made here: 4,000 conversations of 1 to 4 turns whose answers run from a few words to a
few sentences (so lengths vary as real chat data does), ChatML through lmtrain's own tokenizer.
Both packing modes train the embedded default model's shape (2 x 96, block 256 here) for the same
steps from the same seed; each row prints tokens/s (all row positions, and the trained ones), the
share of positions that are padding, and the val loss (per trained token, the same val rows).

Serving uses the packed run: a server in this process on 127.0.0.1, the official `openai` client,
sampled replies of 64 tokens (temperature 1, fixed seeds; an undertrained model rarely stops
early, and completion tokens are counted from the usage either way).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = ("river stone cloud garden lantern harbor meadow violin copper orchard falcon glacier canyon ember "
         "thunder willow marble compass beacon saddle").split()


def make_conversations(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": "You answer questions about words."})
            for _ in range(rng.randint(1, 4)):
                word = rng.choice(WORDS)
                messages.append({"role": "user", "content": f"Tell me about the {word}."})
                sentences = [f"The {word} is {rng.choice(WORDS)}-like and {rng.choice(WORDS)}-colored."
                             for _ in range(rng.randint(1, 5))]
                messages.append({"role": "assistant", "content": " ".join(sentences)})
            f.write(json.dumps({"messages": messages}) + "\n")


def train_variant(workdir: Path, source: Path, packing: str, steps: int) -> dict:
    import numpy as np

    from lmtrain.config import load_config
    from lmtrain.data import RunData
    from lmtrain.packing import build_row
    from lmtrain.prepare import build_shards, train_tokenizer
    from lmtrain.train import train

    run_dir = workdir / packing
    sets = [f"run.dir={run_dir}", f"data.source={source}", "data.format=chat", f"data.packing={packing}",
            "data.val_fraction=0.05", "model.block_size=256", f"train.max_steps={steps}", "train.batch_size=16",
            "train.eval_every=1000", "train.checkpoint_every=1000", "train.warmup_steps=20"]
    config = load_config(None, sets)
    train_tokenizer(config)
    build_shards(config)
    data = RunData.open(config)
    rows = data.train.rows(np.arange(len(data.train)), packing)
    sample = [build_row(data.train, members) for members in rows[:400]]
    filled = sum(int(sum(data.train.length[i] for i in members)) for members in rows[:400])
    trained = sum(int((r.targets != -100).sum()) for r in sample)
    result = train(config)
    positions = steps * 16 * 256
    return {"packing": packing, "rows_per_epoch": len(rows), "steps": steps,
            "epochs": round(steps * 16 / len(rows), 2),
            "padding_share": round(1 - filled / (len(sample) * 257), 3),
            "tokens_per_s": round(result.tokens_per_sec), "trained_tokens_per_s":
                round(result.tokens_per_sec * trained / (len(sample) * 256)),
            "train_seconds": round(result.seconds, 1), "val_loss": round(result.val_loss, 4),
            "positions_trained": positions, "run": str(run_dir)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(run_dir: str, max_tokens: int) -> list[dict]:
    import openai
    import uvicorn

    from lmtrain.server import create_app, open_server

    server = open_server(run_dir, slots=8, queue_size=64, name="bench")
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)

    def one(i: int) -> int:
        reply = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"Tell me about the {WORDS[i % len(WORDS)]}."}],
            max_tokens=max_tokens, temperature=1.0, seed=i)
        return reply.usage.completion_tokens

    one(0)  # warm up
    rows = []
    for concurrency in (1, 4, 8):
        requests = 16
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            tokens = sum(pool.map(one, range(requests)))
        seconds = time.perf_counter() - start
        rows.append({"concurrent": concurrency, "requests": requests, "seconds": round(seconds, 2),
                     "requests_per_s": round(requests / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                     "completion_tokens": tokens})
    uv.should_exit = True
    thread.join(timeout=30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-chat"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.workdir / "conversations.jsonl"
    make_conversations(source, 4000)
    results = [train_variant(args.workdir, source, packing, args.steps) for packing in ("pack", "pad")]
    for row in results:
        print(json.dumps(row))
    for row in bench_serve(results[0]["run"], args.max_tokens):
        print(json.dumps({"serve": row}))


if __name__ == "__main__":
    main()
