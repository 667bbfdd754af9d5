"""scripts/e2e_model.py (the GPU machine's real-model check) run here on the CPU with a tiny
model of the same structure, so the script cannot rot between GPU sessions: freeze through the
connector's worker code, thaw from the RAM tier and from disk, logits after thaw equal a run
that never froze."""

import json
import subprocess
import sys

import pytest

from cwm_env import CWM, ROOT

pytest.importorskip("transformers")


def test_e2e_model_script_on_cpu(tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "e2e_model.py"), str(tmp_path), str(CWM),
         "--device", "cpu", "--tiny", "--layers", "2", "--lengths", "256,512"],
        capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "e2e-model.json").read_text())
    assert all(c["pass"] for c in r["checks"]), r["checks"]
    for n in ("256", "512"):
        x = r["lengths"][n]
        assert x["logits_exact"] and x["tier_report"]["blocks_from_tier"] == int(n) // 16
        assert x["disk_report"]["blocks_from_tier"] == 0
