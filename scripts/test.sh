#!/usr/bin/env bash
# Runs every test of cwm: unit tests, integration tests (both I/O engines), doc tests.
# Needs only a Rust toolchain; CPU only (the GPU checks live in scripts/gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin cwm
cargo test --release -- --test-threads="${CWM_TEST_THREADS:-2}"
