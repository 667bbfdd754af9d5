#!/usr/bin/env bash
# One call on a GPU machine (NVIDIA GPU, driver, Python with PyTorch; no Rust, no internet):
# correctness of the CUDA backend across layouts and its throughput against the ceilings
# measured in the same run, then the real-model check, then (with the seconds left of
# CWM_CHECK_SECONDS, default 570) the host benches this project's 2-core VM cannot settle
# (scripts/host-bench.sh). Needs the prebuilt cwm: target/gpu-bundle/cwm from
# scripts/gpu-bundle.sh (carry `target/gpu-bundle`; it also brings redis-server for the remote
# bench), else target/release/cwm. Writes gpu-check.json and gpu-check.txt under $OUT (or the
# directory given as the first argument); prints the tables last; exits non-zero on any failed
# check.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET="${CWM_CHECK_SECONDS:-570}"
left() { echo $((BUDGET - ($(date +%s) - START))); }
OUT_DIR="${1:-${OUT:-./gpu-check-out}}"
mkdir -p "$OUT_DIR"
if [[ -z "${CWM:-}" && -x target/gpu-bundle/cwm ]]; then
  CWM="$PWD/target/gpu-bundle/cwm"
  export PATH="$PWD/target/gpu-bundle/bin:$PATH"
fi
CWM="${CWM:-$PWD/target/release/cwm}"
PY="$(command -v python3 || command -v python)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"
# libnvrtc: from a CUDA toolkit or from the pip nvidia-* packages torch brings.
extra=$("$PY" - <<'PY'
import glob, os, site
dirs = set()
roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
roots += glob.glob("/usr/local/cuda-*/lib64")
for r in roots:
    for p in glob.glob(os.path.join(r, "**", "libnvrtc.so*"), recursive=True):
        if "stubs" not in p:  # a stub libcuda there would shadow the driver's
            dirs.add(os.path.dirname(p))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "libnvrtc dirs: ${extra:-none found}"
"$CWM" --version || { echo "FAIL: $CWM does not run here"; exit 1; }
export CWM_GPU_DIR="${CWM_GPU_DIR:-/tmp}"
timeout 280 "$PY" scripts/gpu_check.py "$OUT_DIR" "$CWM" 2>&1 | tee "$OUT_DIR/gpu-check.log"
rc=${PIPESTATUS[0]}
# A real model (transformers, Llama-3.1-8B shape, random weights) frozen and thawed through the
# connector's worker code: logits after thaw vs never frozen, TTFT thaw vs recompute.
# CWM_E2E_MODEL=0 skips it (saying so); CWM_E2E_LENGTHS overrides 2048,8192,32768.
e2e_s=$(left); ((e2e_s > 300)) && e2e_s=300
if ((e2e_s < 30)); then
  echo "SKIPPED: scripts/e2e_model.py (${e2e_s}s left of CWM_CHECK_SECONDS)"
elif [[ "${CWM_E2E_MODEL:-1}" == 1 ]]; then
  timeout "$e2e_s" "$PY" scripts/e2e_model.py "$OUT_DIR" "$CWM" \
    --lengths "${CWM_E2E_LENGTHS:-2048,8192,32768}" 2>&1 | tee "$OUT_DIR/e2e-model.log"
  rc2=${PIPESTATUS[0]}
  [[ $rc -eq 0 ]] && rc=$rc2
else
  echo "SKIPPED: scripts/e2e_model.py (CWM_E2E_MODEL=0)"
fi
# Host benches with what is left (each one skipped, saying so, when it would not fit).
# CWM_HOST_BENCH=0 skips them.
if [[ "${CWM_HOST_BENCH:-1}" == 1 ]]; then
  scripts/host-bench.sh "$OUT_DIR" "$(left)" "$CWM" 2>&1 | tee "$OUT_DIR/host-bench.log"
  rc3=${PIPESTATUS[0]}
  [[ $rc -eq 0 ]] && rc=$rc3
else
  echo "SKIPPED: scripts/host-bench.sh (CWM_HOST_BENCH=0)"
fi
exit "$rc"
