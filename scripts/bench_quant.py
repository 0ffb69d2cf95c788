#!/usr/bin/env python
"""What GGUF quantization costs: file size and val bpb of each --quant type against the checkpoint.

    python scripts/bench_quant.py --run runs/default [--out-dir exports/quant]

Exports the run's latest checkpoint once per type (`lmtrain export --format gguf --quant T`),
reads each file back dequantized (`lmtrain eval --gguf`, the run's whole val split) and prints a
markdown table: type, file size, bpb, and the change against the fp32 checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args()

    from lmtrain.evaluate import evaluate
    from lmtrain.export import GGUF_QUANTS, export

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="lmtrain-quant-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    base = evaluate(args.run)
    print(f"checkpoint {base.checkpoint} (step {base.step}): val bpb {base.bpb:.4f} on {base.tokens:,} tokens\n")
    print("| --quant | file size | val bpb | change |")
    print("| --- | ---: | ---: | ---: |")
    for quant in GGUF_QUANTS:
        path = out_dir / f"model-{quant}.gguf"
        export(args.run, "gguf", path, quant=quant, force=True)
        scored = evaluate(args.run, gguf=path)
        print(f"| {quant} | {path.stat().st_size / 1e6:.2f} MB | {scored.bpb:.4f} | {scored.bpb - base.bpb:+.4f} |")
    if args.out_dir is None:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
