#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one go, for a machine with one CUDA GPU.
#
#     bash scripts/gpu_bench.sh OUTDIR [RUN_DIR]
#
# 1. the machine: GPU, driver, torch, and the bf16 rate of a large matmul (the real ceiling);
# 2. the CUDA-only tests (CUDA-graph decoding equals eager decoding);
# 3. bench_train.py on configs/gpt2-small.yaml at micro-batches 8, 16 and 32 (64 too when the
#    GPU has the memory), each at the config's 524,288 tokens per step; the runs compile at the
#    same time and take their timings one at a time (--lock);
# 4. bench_sample.py on gpt2-small: CUDA graph, eager and uncached decoding at batch 1 and 8;
# 5. with RUN_DIR (a run directory holding config.yaml, tokenizer/ and data/, e.g. prepared on
#    a CPU machine with `lmtrain tokenize` and `lmtrain shard`): the real CLI on the GPU,
#    `lmtrain train`, `sample` and `eval`, which needs no `datasets` package.
# Logs and JSON lines go to OUTDIR; a summary is printed last.
set -u
OUT=${1:?usage: gpu_bench.sh OUTDIR [RUN_DIR]}
RUN=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
section() { echo; echo "== $* ($(date +%T), ${SECONDS}s)"; }

section machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/machine.txt"
$PY - <<'EOF' | tee -a "$OUT/machine.txt"
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(20):
    a @ b
torch.cuda.synchronize()
print(f"bf16 matmul 8192^3, random data: {2 * 8192**3 * 20 / (time.perf_counter() - start) / 1e12:.0f} TFLOP/s")
EOF
GPU_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)

section CUDA tests
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_sample.py -k cuda 2>&1 | tail -3

section "bench_train gpt2-small, micro-batch 8 / 16 / 32, 524,288 tokens per step"
SIZES="8 16 32"
for B in $SIZES; do
  timeout 420 $PY scripts/bench_train.py --config configs/gpt2-small.yaml --set train.batch_size=$B \
    --set train.grad_accum=$((512 / B)) --steps 6 --warmup 3 --lock "$OUT/.lock" >"$OUT/train_b$B.log" 2>&1 &
done
wait
if [ "${GPU_MB:-0}" -gt 120000 ]; then
  SIZES="$SIZES 64"
  timeout 300 $PY scripts/bench_train.py --config configs/gpt2-small.yaml --set train.batch_size=64 \
    --set train.grad_accum=8 --steps 6 --warmup 3 >"$OUT/train_b64.log" 2>&1
fi
for B in $SIZES; do echo "-- batch $B"; tail -n 11 "$OUT/train_b$B.log"; done

section "bench_sample gpt2-small"
timeout 300 $PY scripts/bench_sample.py --config configs/gpt2-small.yaml --batches 1,8 2>&1 | tee "$OUT/sample.log" | tail -5

if [ -n "$RUN" ]; then
  section "lmtrain train / sample / eval on $RUN"
  timeout 300 $PY -m lmtrain train --config "$RUN/config.yaml" 2>&1 | tr '\r' '\n' | grep -v '^train:' >"$OUT/e2e.log"
  tail -n 6 "$OUT/e2e.log"
  timeout 120 $PY -m lmtrain sample --run "$RUN" --max-new-tokens 200 --num-samples 2 2>&1 | tee -a "$OUT/e2e.log" | tail -n 12
  timeout 120 $PY -m lmtrain eval --run "$RUN" 2>&1 | tee -a "$OUT/e2e.log" | tail -n 4
  cp "$RUN/train.log" "$OUT/e2e_train.log" 2>/dev/null
fi

section summary
for B in $SIZES; do grep -h '^{' "$OUT/train_b$B.log" | $PY -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(f\"train batch {r['batch_size']:>3} x accum {r['grad_accum']:>2}: {r['tokens_per_sec']:>10,.0f} tok/s  \"
          f\"MFU {r['mfu']:.1%}  peak {r['peak_memory_mb']:,.0f} MB  step {r['step_ms']:.0f} ms  compile {r['warmup_seconds']:.0f} s\")
"; done
grep -h '^{' "$OUT/sample.log" 2>/dev/null | $PY -c "
import json, sys
for line in sys.stdin:
    for r in json.loads(line)['results']:
        print(f\"sample batch {r['batch']}: graph {r['cached_tokens_per_sec']:,.0f}  eager {r.get('cached_eager_tokens_per_sec', 0):,.0f}  uncached {r['uncached_tokens_per_sec']:,.0f} tok/s\")
"
echo "done in ${SECONDS}s"
