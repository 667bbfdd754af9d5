#!/usr/bin/env bash
# The host benches whose goals this 2-core development VM cannot settle, run on a machine with
# cores and a disk to spare (the GPU machine, from scripts/gpu-check.sh, or by hand):
#   remote  `cwm bench remote` — push/pull through a local 3-master Redis Cluster vs the raw
#           client (needs redis-server and redis-cli on PATH; scripts/gpu-bundle.sh carries them)
#   churn   `cwm bench churn` — 16 clients freezing under eviction vs the raw disk (fifo, lru)
#   store   `cwm bench store` — store write/read vs raw O_DIRECT (and fio when installed)
# Each writes host-<name>.json (and .log) under OUT_DIR; one that would not finish within the
# seconds left is skipped, saying so. Prints a table of every ratio last; exits non-zero when a
# bench that ran failed.
# usage: scripts/host-bench.sh OUT_DIR [SECONDS] [CWM]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:?usage: scripts/host-bench.sh OUT_DIR [SECONDS] [CWM]}"
BUDGET="${2:-600}"
CWM="${3:-${CWM:-$PWD/target/release/cwm}}"
DIR="${CWM_BENCH_DIR:-${CWM_GPU_DIR:-${TMPDIR:-/tmp}}}"
PY="$(command -v python3 || command -v python)"
mkdir -p "$OUT_DIR"
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
rc=0
# name, seconds it needs at most, then the bench's arguments.
bench() {
    local name=$1 need=$2
    shift 2
    if (($(left) < need)); then
        echo "SKIPPED: host bench $name (needs up to ${need}s, $(left)s left)" | tee "$OUT_DIR/host-$name.log"
        return
    fi
    echo "== host bench $name: cwm bench $*"
    timeout "$need" "$CWM" bench "$@" --dir "$DIR" --json >"$OUT_DIR/host-$name.json" 2>"$OUT_DIR/host-$name.log"
    local r=$?
    if ((r != 0)); then
        echo "FAIL: host bench $name exited $r: $(tail -c 600 "$OUT_DIR/host-$name.log")"
        rm -f "$OUT_DIR/host-$name.json"
        rc=1
    fi
}
nproc >"$OUT_DIR/host-machine.txt"
df -h "$DIR" >>"$OUT_DIR/host-machine.txt" 2>&1
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    bench remote 150 remote --bytes 2GiB
else
    echo "SKIPPED: host bench remote (no redis-server/redis-cli on PATH)" | tee "$OUT_DIR/host-remote.log"
fi
bench churn-fifo 90 churn --clients 16 --seconds 15 --policy fifo
bench churn-lru 90 churn --clients 16 --seconds 15 --policy lru
bench store 150 store --bytes 4GiB --runs 3
"$PY" - "$OUT_DIR" <<'PY' | tee "$OUT_DIR/host-bench.txt"
import json, os, sys
out = sys.argv[1]
def load(n):
    try:
        with open(os.path.join(out, f"host-{n}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def f(x):
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)
rows = []
r = load("remote")
if r:
    rows += [("remote push GB/s, x raw SET", r.get("push_gbps"), r.get("push_ratio")),
             ("remote pull GB/s, x raw GET", r.get("pull_gbps"), r.get("pull_ratio")),
             ("remote pull, x slower ceiling", r.get("pull_gbps"), r.get("pull_ratio_of_slower")),
             ("remote pull into engine, x raw GET", r.get("engine_pull_gbps"), r.get("engine_pull_ratio")),
             ("remote fill GB/s, x raw", r.get("fill_gbps"), r.get("fill_ratio"))]
for p in ("fifo", "lru"):
    c = load(f"churn-{p}")
    if c:
        rows += [(f"churn {p} freeze GB/s, x raw write", c.get("freeze_gbps"), c.get("freeze_ratio")),
                 (f"churn {p} lookup p99 us (goal <= 1000)", c.get("lookup_p99_us"), None)]
s = load("store")
if s:
    rows += [("store write GB/s, x raw", s.get("write_gbps"), s.get("write_ratio")),
             ("store read GB/s, x raw", s.get("read_gbps"), s.get("read_ratio")),
             ("store read, x fio", s.get("read_gbps"), s.get("fio_read_ratio"))]
print(f"{'host bench':42} {'value':>10} {'ratio':>8}")
for name, v, ratio in rows:
    print(f"{name:42} {f(v):>10} {f(ratio):>8}")
PY
exit "$rc"
