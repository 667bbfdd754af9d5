"""Automatic saving against real vLLM (the CPU build): with the connector's ``save: "all"``,
every finished request's full blocks are stored as an unnamed window, and a later request that
shares a long prefix with it is served from cwm without any ``kv_transfer_params`` — also after
both vLLM and cwm restarted; outputs equal the no-cwm reference exactly. A request that opts out
(``{"cwm": {"save": false}}``) stores nothing. Under a budget far below what the requests save,
cwm evicts unnamed windows while vLLM keeps serving every request exactly, and a pinned window
survives and still serves its prefix. vLLM's own prefix cache is off in the cwm runs, so what is
served comes from cwm.
"""

from __future__ import annotations

import pytest

from cwm_env import CWM, Cwm, cpu_binding, run_vllm, same, tokens

vllm = pytest.importorskip("vllm", reason="vLLM is installed by scripts/test.sh (scripts/vllm-env.sh)")

BS = 32
GEN = 8


def test_save_all_serves_a_shared_prefix_without_params(tmp_path):
    from tiny_model import make

    model = make(str(tmp_path / "model"))
    P, R, S = tokens(11, 4 * BS), tokens(12, 70), tokens(13, 20)
    requests = [
        {"prompt": P, "max_tokens": GEN},
        {"prompt": R, "max_tokens": GEN},
        {"prompt": {"from": 0, "generated": GEN - 1, "suffix": S}, "max_tokens": GEN},
    ]
    ref = run_vllm(tmp_path, "reference", {"model": model, "socket": None, "requests": requests})
    binding = cpu_binding(tmp_path, "reference")
    cwm = Cwm(tmp_path).start()
    try:
        def run(name: str, reqs: list[dict]) -> list[dict]:
            out = run_vllm(tmp_path, name, {"model": model, "socket": str(cwm.sock),
                                            "prefix_caching": False,
                                            "extra_config": {"save": "all"}, "requests": reqs})
            got = cpu_binding(tmp_path, name)
            assert got == binding, f"{name} ran on {got}, the reference on {binding}"
            return out

        hits0 = cwm.metric("cwm_lookup_hits_total")
        out = run("save-all", [
            {"prompt": P, "max_tokens": GEN},
            # Opted out: not stored.
            {"prompt": R, "max_tokens": GEN, "params": {"cwm": {"save": False}}},
            # Waits until P's window is durable, then shares P's prefix.
            {"prompt": {"from": 0, "generated": GEN - 1, "suffix": S}, "max_tokens": GEN,
             "before": f"for i in $(seq 100); do {CWM} ls --json --socket {cwm.sock} | "
                       f"grep -q '\"auto-' && break; sleep 0.1; done"},
        ])
        for i, what in enumerate(["P", "R (not saved)", "P + generated + S"]):
            same(out[i], ref[i], what)
        kv0 = out[0]["kv_transfer_params"]["cwm"]
        assert kv0["status"] == "pending" and kv0["class"] == "unnamed", kv0
        # Only full blocks are saved: P and its generated tokens, cut to whole blocks.
        assert kv0["tokens"] == (len(P) + GEN - 1) // BS * BS, kv0
        assert out[1]["kv_transfer_params"] is None, out[1]
        # The third request's prefix came from cwm (vLLM's own prefix cache is off).
        assert out[2]["num_cached_tokens"] >= 4 * BS, out[2]["num_cached_tokens"]
        assert cwm.metric("cwm_lookup_hits_total") > hits0
        ws = cwm.windows()
        auto = {n: w for n, w in ws.items() if n.startswith("auto-")}
        assert len(auto) == 2, ws  # P's and the third request's; not R's
        assert all(w["class"] == "unnamed" for w in auto.values()), auto
        assert not any(w["num_tokens"] == (len(R) + GEN - 1) // BS * BS for w in auto.values())

        # Both restart: a fresh engine and a fresh cwm serve the prefix from disk.
        cwm.stop()
        cwm.start()
        out2 = run("after-restart", [requests[2] | {"prompt": out[2]["prompt"]}])
        same(out2[0], ref[2], "P + generated + S after restarts")
        assert out2[0]["num_cached_tokens"] >= 4 * BS, out2[0]["num_cached_tokens"]
    finally:
        cwm.stop()


def test_a_tiny_budget_evicts_unnamed_windows_and_keeps_the_pinned_one(tmp_path):
    from tiny_model import make

    model = make(str(tmp_path / "model"))
    P, S = tokens(21, 4 * BS), tokens(22, 20)
    # 12 unrelated prompts of 3 full blocks each: 36 blocks of 36 KiB records into a 1 MiB
    # budget that holds ~27, with the pinned window's 5.
    others = [tokens(100 + i, 3 * BS) for i in range(12)]
    requests = ([{"prompt": P, "max_tokens": GEN}]
                + [{"prompt": o, "max_tokens": GEN} for o in others]
                + [{"prompt": {"from": 0, "generated": GEN - 1, "suffix": S}, "max_tokens": GEN}])
    ref = run_vllm(tmp_path, "reference", {"model": model, "socket": None, "requests": requests})
    binding = cpu_binding(tmp_path, "reference")
    cwm = Cwm(tmp_path, capacity="1MiB", segment_size="128KiB").start()
    try:
        reqs = [dict(r) for r in requests]
        reqs[0]["params"] = {"cwm": {"freeze_as": "pinned-conv"}}
        reqs[1]["before"] = (f"for i in $(seq 100); do {CWM} stat pinned-conv --socket {cwm.sock} "
                             f">/dev/null 2>&1 && break; sleep 0.1; done")
        out = run_vllm(tmp_path, "tiny-budget", {"model": model, "socket": str(cwm.sock),
                                                 "prefix_caching": False,
                                                 "extra_config": {"save": "all"},
                                                 "requests": reqs})
        got = cpu_binding(tmp_path, "tiny-budget")
        assert got == binding, f"ran on {got}, the reference on {binding}"
        for i, (o, r) in enumerate(zip(out, ref)):
            same(o, r, f"request {i} under eviction")
        # The conversation's prefix came from the pinned window.
        assert out[-1]["num_cached_tokens"] >= 4 * BS, out[-1]["num_cached_tokens"]
        ws = cwm.windows()
        assert ws["pinned-conv"]["class"] == "pinned", ws
        assert cwm.metric("cwm_evictions_total") > 0, "nothing was evicted"
        auto = [n for n in ws if n.startswith("auto-")]
        assert len(auto) < len(others), f"every unnamed window is still there: {auto}"
    finally:
        cwm.stop()
