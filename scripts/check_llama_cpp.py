#!/usr/bin/env python
"""Check a GGUF export in the real llama.cpp: same tokens, same logits, same greedy text as lmtrain.

    pip install llama-cpp-python          # builds llama.cpp from source: minutes on 2 cores
    python scripts/check_llama_cpp.py --run runs/default [--checkpoint latest] [--text "..."]

Exports the checkpoint with `lmtrain export --format gguf` into a temporary directory, loads it
with llama-cpp-python, and compares (1) llama.cpp's tokenization of --text with lmtrain's,
(2) the logits at every position of that text (max absolute difference; llama.cpp computes in its
own kernels, so agreement is to about 1e-4, not bit-exact), and (3) 24 greedy tokens from a short
prompt. Not part of the test suite: building llama.cpp takes longer than the whole suite.
Prints a table and one JSON line; exits 1 if the tokens or the greedy text differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmtrain.export import export
from lmtrain.inference import load_model

TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naïve, 世界 👋\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--prompt", default="class ")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("this check needs llama-cpp-python: pip install llama-cpp-python")

    loaded = load_model(args.run, args.checkpoint, "cpu")
    block = loaded.model.config.block_size
    with tempfile.TemporaryDirectory(prefix="lmtrain-gguf-") as tmp:
        path = Path(tmp) / "model.gguf"
        exported = export(args.run, "gguf", path, args.checkpoint)
        llm = Llama(model_path=str(path), n_ctx=block, logits_all=True, verbose=False, n_threads=2)
        ours_ids = loaded.tokenizer.encode(args.text, add_special_tokens=False).ids[:block]
        theirs_ids = llm.tokenize(args.text.encode("utf-8"), add_bos=False, special=False)[:block]
        llm.reset()
        llm.eval(ours_ids)
        theirs_logits = np.array(llm.scores[: len(ours_ids)], dtype=np.float32)[:, : loaded.model.config.vocab_size]
        with torch.no_grad():
            ours_logits = loaded.model(torch.tensor([ours_ids]))[0][0].numpy()
        diff = float(np.abs(theirs_logits - ours_logits).max())
        agree = float((theirs_logits.argmax(-1) == ours_logits.argmax(-1)).mean())

        prompt = loaded.tokenizer.encode(args.prompt, add_special_tokens=False).ids
        llm.reset()
        theirs_greedy = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            if token == loaded.eot_id or len(theirs_greedy) == args.new_tokens:
                break
            theirs_greedy.append(int(token))
        from lmtrain.generate import SamplingParams, generate

        ours_greedy = []
        for token in generate(loaded.model, torch.tensor([prompt]), args.new_tokens, SamplingParams(temperature=0.0)):
            if int(token) == loaded.eot_id:
                break
            ours_greedy.append(int(token))

    report = {"run": str(args.run), "checkpoint": exported.checkpoint, "architecture": exported.architecture,
              "tokens": len(ours_ids), "same_tokens": ours_ids == theirs_ids, "max_abs_logit_diff": diff,
              "argmax_agreement": agree, "greedy_tokens": len(ours_greedy), "same_greedy": ours_greedy == theirs_greedy,
              "greedy_text": loaded.tokenizer.decode(ours_greedy)}
    print(f"llama.cpp vs lmtrain on {args.run} ({exported.checkpoint}, {exported.architecture})")
    for key in ("tokens", "same_tokens", "max_abs_logit_diff", "argmax_agreement", "greedy_tokens", "same_greedy"):
        print(f"  {key:<22}{report[key]}")
    print(json.dumps(report))
    sys.exit(0 if report["same_tokens"] and report["same_greedy"] else 1)


if __name__ == "__main__":
    main()
