#!/usr/bin/env bash
# Redraws the plots docs/PERFORMANCE.md shows (docs/plots/*.svg) from the reports checked in
# beside them: docs/bench/*.json (host benchmarks) and the newest GPU report in docs/gpu/.
#   scripts/plots.sh            redraw from the checked-in reports
#   scripts/plots.sh --measure  first rerun the host benchmarks on this machine (~6 min on
#                               2 cores), replacing docs/bench/*.json, then redraw
# tests/docs_plots.rs checks that the checked-in plots are what this draws.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin cwm
CWM=target/release/cwm
if [[ "${1:-}" == --measure ]]; then
  dir="$(mktemp -d)"
  trap 'rm -rf "$dir"' EXIT
  $CWM bench store --bytes 2GiB --block-bytes 2MiB --runs 3 --dir "$dir" --json >docs/bench/store.json
  $CWM bench pipeline --tokens 16384 --runs 3 --dir "$dir" --json >docs/bench/pipeline.json
  $CWM bench compaction --bytes 1GiB --dir "$dir" --json >docs/bench/compaction.json
  $CWM bench control --windows 10000 --dir "$dir" --json >docs/bench/control.json
  $CWM bench recovery --records 100000 --dir "$dir" --json >docs/bench/recovery.json
  $CWM bench trace --trace bench/traces/mooncake-synthetic.jsonl --replay-at 0.05,0.1 \
    --dir "$dir" --json >docs/bench/trace.json
  $CWM bench churn --clients 16 --seconds 15 --dir "$dir" --json >docs/bench/churn.json
  echo "$(date -u +%F), $(nproc) cores, $(uname -m), $(df -T "$dir" | awk 'NR==2 {print $2}')" \
    >docs/bench/MACHINE.txt
fi
for kind in store pipeline compaction control recovery trace churn; do
  $CWM plot "docs/bench/$kind.json" --out "docs/plots/host-$kind.svg"
done
# The newest GPU report that holds measurements (scripts/gpu-check.sh's JSON).
for f in $(ls docs/gpu/*.json | grep -v e2e-model | sort -r); do
  if $CWM plot "$f" --out docs/plots/gpu.svg 2>/dev/null; then
    echo "gpu: $f" >docs/plots/SOURCES.txt
    break
  fi
done
ls -l docs/plots
