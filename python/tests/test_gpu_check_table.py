"""scripts/gpu_check.py's closing table, rendered here on the CPU from a bench record shaped like
`cwm gpu-check bench`'s JSON (paths measured, skipped and fallen back included), so a
formatting slip cannot cost a GPU session."""

import importlib.util

import pytest

from cwm_env import ROOT

pytest.importorskip("torch")


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # no GPU touched at import
    return mod


def bench():
    b = {k: 50.0 for k in ("d2h_pinned_gbps", "h2d_pinned_gbps", "gather_gbps", "scatter_gbps",
                           "torch_gather_gbps", "torch_scatter_gbps", "freeze_gbps", "thaw_gbps",
                           "tier_thaw_gbps")}
    b.update(grid=8, gather_ratio=0.94, scatter_ratio=0.92, raw_write_gbps=2.0,
             raw_read_gbps=1.8, freeze_ratio=1.0, thaw_ratio=1.05, tier_ratio=0.91,
             grid_sweep=[{"grid": 8, "threads": 512, "gather_gbps": 51.9, "scatter_gbps": 51.1}])
    b["scatter_paths"] = [
        {"path": "copy-engine", "grid": 8, "took": "copy-engine", "scatter_gbps": 30.1,
         "scatter_ratio": 0.54, "error": None},
        {"path": "l2", "grid": 16, "took": "l2", "scatter_gbps": 52.0, "scatter_ratio": 0.94,
         "error": None},
        {"path": "bulk", "grid": 8, "took": "kernel", "scatter_gbps": 51.0,
         "scatter_ratio": 0.92, "error": None},
        {"path": "bulk", "grid": 16, "took": "bulk", "scatter_gbps": None,
         "scatter_ratio": None, "error": "bulk cannot run on this GPU or driver"},
    ]
    b["tier_paths"] = [
        {"path": "l2", "took": "l2", "tier_gbps": 49.0, "tier_ratio": 0.89,
         "blocks_from_tier": 1024, "error": None},
        {"path": "bulk", "took": "bulk", "tier_gbps": None, "tier_ratio": None,
         "blocks_from_tier": None, "error": "scatter failed"},
    ]
    b["stream"] = {"gbps": 45.0, "ratio": 0.9, "staged": True}
    return b


def test_table_renders_every_path():
    g = load()
    results = {"checks": [{"ok": True}, {"ok": False}], "device": "NVIDIA H200", "torch": "2.11"}
    t = g.render(results, bench(), 1)
    assert t.splitlines()[0] == "cwm gpu-check on NVIDIA H200 (torch 2.11)"
    assert "scatter path l2 (grid 16)" in t and "0.940" in t
    assert "(took kernel)" in t, "a path that fell back is marked"
    assert "scatter path bulk: bulk cannot run on this GPU or driver" in t
    assert "RAM tier thaw, bulk scatter: scatter failed" in t
    assert "thaw as it arrives (via staging)" in t and "0.900" in t
    failed = dict(bench(), stream={"error": "the stream did not restore the window"})
    assert "thaw as it arrives: the stream did not restore the window" in g.render(results, failed, 1)
    assert t.splitlines()[-1] == "1 passed, 1 failed"
    # Without a bench record (it failed) the table still closes with the counts.
    assert g.render(results, None, 1).splitlines()[-1] == "1 passed, 1 failed"
