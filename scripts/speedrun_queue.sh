#!/usr/bin/env bash
# One speedrun round after another: NAME followed by its --set arguments, one variant per line of
# the file given (# comments and blank lines skipped). Appends to runs/speedrun/log.jsonl.
#   bash scripts/speedrun_queue.sh round.txt
set -euo pipefail
cd "$(dirname "$0")/.."
while read -r name sets; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  args=()
  for s in $sets; do args+=(--set "$s"); done
  .venv/bin/python scripts/speedrun.py --name "$name" "${args[@]}" 2>/dev/null | tail -1
done < "$1"
