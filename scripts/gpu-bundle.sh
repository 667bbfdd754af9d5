#!/usr/bin/env bash
# Builds target/gpu-bundle/: what a GPU machine without a Rust toolchain or internet needs to run
# scripts/gpu-check.sh and its host benches — the release `cwm` without debug info (the
# debug-info build is larger than what a device call can take along), and, when this machine
# has them, `redis-server` and `redis-cli` with every shared library they load (glibc and its
# loader included, so they run whatever glibc the GPU machine has), started through wrappers
# in target/gpu-bundle/bin. Carry the one folder: `target/gpu-bundle`.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/gpu-bundle
cargo build --release
rm -rf "$B"
mkdir -p "$B/bin" "$B/lib"
objcopy --strip-debug target/release/cwm "$B/cwm"
loader=/lib64/ld-linux-x86-64.so.2
for tool in redis-server redis-cli; do
    src=$(command -v "$tool" || true)
    if [[ -z "$src" ]]; then
        echo "gpu-bundle: no $tool here; the remote bench will be skipped there" >&2
        continue
    fi
    cp -L "$src" "$B/lib/$tool"
    ldd "$src" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
        cp -Ln "$lib" "$B/lib/" 2>/dev/null || true
    done
    cp -L "$loader" "$B/lib/ld-linux-x86-64.so.2"
    # The bundled loader with the bundled libraries only; argv[0] stays the tool's name.
    cat > "$B/bin/$tool" <<EOF
#!/bin/sh
d=\$(cd "\$(dirname "\$0")/../lib" && pwd)
exec "\$d/ld-linux-x86-64.so.2" --library-path "\$d" --argv0 $tool "\$d/$tool" "\$@"
EOF
    chmod +x "$B/bin/$tool"
done
du -sh "$B"
