"""Two vLLM replicas, each with its own cwm, sharing one Redis Cluster (real vLLM, CPU build;
Debian's redis-server). Through the first: a conversation frozen by name, and a request saved
automatically (``save: "all"``). Through the second, whose cwm has never seen either: the named
conversation resumes (``{"cwm": {"thaw": NAME}}``: its lookup matches the manifest in the tier,
its thaw pulls the window), and a request sharing the automatically saved prefix is served
without any ``kv_transfer_params`` (its lookup finds the blocks in the tier, its thaw fetches
them by key). Outputs equal the no-cwm reference exactly; vLLM's own prefix cache is off in the
cwm runs, so what is served came from cwm.
"""

from __future__ import annotations

import json
import time

import pytest

from cwm_env import Cwm, RedisCluster, cpu_binding, run_vllm, same, tokens

vllm = pytest.importorskip("vllm", reason="vLLM is installed by scripts/test.sh (scripts/vllm-env.sh)")

BS = 32
GEN = 8


def test_a_conversation_frozen_through_one_replica_resumes_through_another(tmp_path):
    from tiny_model import make

    model = make(str(tmp_path / "model"))
    P, S, Q, T = tokens(31, 4 * BS), tokens(32, 20), tokens(33, 4 * BS), tokens(34, 20)
    requests = [
        {"prompt": P, "max_tokens": GEN},
        {"prompt": {"from": 0, "generated": GEN - 1, "suffix": S}, "max_tokens": GEN},
        {"prompt": Q, "max_tokens": GEN},
        {"prompt": {"from": 2, "generated": GEN - 1, "suffix": T}, "max_tokens": GEN},
    ]
    ref = run_vllm(tmp_path, "reference", {"model": model, "socket": None, "requests": requests})
    binding = cpu_binding(tmp_path, "reference")
    redis = RedisCluster(tmp_path).start()
    a = Cwm(tmp_path / "a", extra=("--remote", redis.url, "--remote-write", "sync"))
    b = Cwm(tmp_path / "b", extra=("--remote", redis.url))
    try:
        a.start()
        b.start()

        def run(c: Cwm, name: str, extra: dict, reqs: list[dict]) -> list[dict]:
            out = run_vllm(tmp_path, name, {"model": model, "socket": str(c.sock),
                                            "prefix_caching": False, "extra_config": extra,
                                            "requests": reqs})
            got = cpu_binding(tmp_path, name)
            assert got == binding, f"{name} ran on {got}, the reference on {binding}"
            return out

        out = run(a, "replica-1", {"save": "all"}, [
            {"prompt": P, "max_tokens": GEN, "params": {"cwm": {"freeze_as": "conv-1"}}},
            {"prompt": Q, "max_tokens": GEN},
        ])
        same(out[0], ref[0], "P through replica 1")
        same(out[1], ref[2], "Q through replica 1")
        # Both freezes published (sync: before their answers) once replica 1's cwm is done.
        pushed = 'cwm_remote_operations_total{op="push",outcome="ok"}'
        for _ in range(300):
            if a.metric(pushed) >= 2:
                break
            time.sleep(0.1)
        assert a.metric(pushed) >= 2, a.log.read_text()[-3000:]
        listed = json.loads(b.cli("ls", "--remote", "--json").stdout)["windows"]
        assert [w["name"] for w in listed] == ["conv-1"], listed  # the unnamed one: blocks only
        assert b.windows() == {}, "replica 2's cwm holds nothing yet"

        conv = ref[0]["prompt"] + ref[0]["token_ids"][: GEN - 1] + S
        shared = ref[2]["prompt"] + ref[2]["token_ids"][: GEN - 1] + T
        out2 = run(b, "replica-2", {}, [
            {"prompt": conv, "max_tokens": GEN, "params": {"cwm": {"thaw": "conv-1"}}},
            {"prompt": shared, "max_tokens": GEN},
        ])
        same(out2[0], ref[1], "the conversation resumed through replica 2")
        same(out2[1], ref[3], "the shared prefix served through replica 2")
        assert out2[0]["kv_transfer_params"]["cwm"]["thaw"]["status"] == "thawed", out2[0]
        for o in out2:
            assert o["num_cached_tokens"] >= 4 * BS, o["num_cached_tokens"]
        ws = b.windows()
        assert ws["conv-1"]["class"] == "pinned", ws  # pulled under its name
        fills = [n for n in ws if n.startswith("fill-4-")]
        assert len(fills) == 1 and ws[fills[0]]["class"] == "unnamed", ws
        assert b.metric('cwm_remote_operations_total{op="lookup",outcome="hit"}') >= 1
        assert b.metric('cwm_remote_operations_total{op="fill",outcome="ok"}') == 1
    finally:
        a.stop()
        b.stop()
        redis.stop()
