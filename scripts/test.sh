#!/usr/bin/env bash
# Runs every test of cwm: unit tests, integration tests (both I/O engines), doc tests, then the
# Python side (client, layouts) and the end-to-end tests against real vLLM on the CPU.
# Needs a Rust toolchain and Python ≥ 3.10; installs vLLM's CPU build into a cached venv
# (scripts/vllm-env.sh, ~3 GB download the first time). CPU only (the GPU checks live in
# scripts/gpu-check.sh). CWM_SKIP_VLLM=1 skips the Python/vLLM part, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin cwm
# tests/kernel_emulation.rs runs the CUDA kernels on the CPU, built by the host C++ compiler.
if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
  echo "installing g++ for the kernel emulation tests"
  if [[ "$(id -u)" == 0 ]]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -q && $SUDO apt-get install -y -q g++
fi
# tests/deploy_monitoring.rs runs the real promtool over deploy/prometheus (Debian: prometheus).
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus) for the alert-rule tests"
  if [[ "$(id -u)" == 0 ]]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends prometheus
fi
# tests/remote_*.rs run a real Redis Cluster (Debian: redis-server, which brings redis-cli).
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "installing redis-server for the shared-tier tests"
  if [[ "$(id -u)" == 0 ]]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends redis-server
fi
# tests/remote_tls.rs makes its CA and certificates with the openssl command-line tool.
if ! command -v openssl >/dev/null 2>&1; then
  echo "installing openssl for the TLS shared-tier test"
  if [[ "$(id -u)" == 0 ]]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends openssl
fi
# Failpoints (cargo feature `failpoints`, never in default builds): every write-path site x
# action, and random faults in random operation sequences. Run first, so target/release/cwm
# is the default build again afterwards.
# tests/clock_skew.rs (EC-042) needs the same build: it injects wall-clock skew.
cargo test --release --features failpoints --test failpoints --test failpoints_random --test clock_skew \
  --test control_idempotency_lost_outcome
# NVRTC, from its PyPI wheel (a compiler library: no GPU, no driver), lets the CPU suite compile
# every CUDA kernel for sm_80 and sm_90 and run ptxas over it. Without it that test says skipped.
NVRTC_DIR="${CWM_NVRTC_DIR:-$HOME/.cache/cwm/nvrtc}"
if ! find "$NVRTC_DIR" -name 'libnvrtc.so.13' 2>/dev/null | grep -q .; then
  python3 -m pip install -q --disable-pip-version-check --target "$NVRTC_DIR" \
    "nvidia-cuda-nvrtc==13.0.*" || echo "could not install NVRTC: the kernel compile test will say skipped"
fi
NVRTC_LIB="$(find "$NVRTC_DIR" -name 'libnvrtc.so.13' 2>/dev/null | head -n 1)"
if [[ -n "$NVRTC_LIB" ]]; then
  export LD_LIBRARY_PATH="$(dirname "$NVRTC_LIB")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
cargo test --release -- --test-threads="${CWM_TEST_THREADS:-2}"
if [[ "${CWM_SKIP_VLLM:-0}" == 1 ]]; then
  echo "SKIPPED: Python and real-vLLM end-to-end tests (CWM_SKIP_VLLM=1)"
  exit 0
fi
PY="$(./scripts/vllm-env.sh | tail -n 1)"
"$PY" -m pip install -q pytest
# The package must install as a user would install it.
"$PY" -m pip install -q --no-deps --force-reinstall ./python
# The connector is also checked against newer GPU-only vLLM releases, read from their wheels on
# PyPI by HTTP range requests (~10 small files each, cached under ~/.cache/cwm/vllm-api).
"$PY" python/tests/vllm_api.py fetch 0.33.0 0.34.0
(cd python/tests && "$PY" -m pytest -v -p no:cacheprovider .)
