"""Tensor parallel (2 ranks, vLLM's CPU build, one process per rank) against real vLLM: each
rank freezes its own slice of the KV as its own window (rank 0 under the name, rank 1 under
``name--r1``), and a fresh TP=2 engine serving a longer prompt thaws both ranks' blocks and
computes exactly the tokens and logprobs of a TP=2 run without cwm, on the same CPUs."""

from __future__ import annotations

import os

import pytest

from cwm_env import CWM, Cwm, cpu_binding, run_vllm, same, tokens

vllm = pytest.importorskip("vllm", reason="vLLM is installed by scripts/test.sh (scripts/vllm-env.sh)")

BS = 32
GEN = 8


def tp_env() -> dict:
    # One NUMA node here: vLLM cannot place two CPU workers itself ("Not enough allowed NUMA
    # nodes to bind threads of 2 local CPUWorkers"); each rank gets one CPU of its own.
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, f"tensor parallel on the CPU needs 2 CPUs, this machine has {cpus}"
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def test_tensor_parallel_ranks_freeze_and_thaw_their_own_slices(tmp_path):
    from tiny_model import make

    model = make(str(tmp_path / "model"))
    P, S = tokens(21, 4 * BS), tokens(22, 20)
    job = lambda socket, requests: {"model": model, "socket": socket,  # noqa: E731
                                    "tensor_parallel_size": 2, "requests": requests}
    ref = run_vllm(tmp_path, "tp-reference", job(None, [
        {"prompt": P, "max_tokens": GEN},
        {"prompt": {"from": 0, "generated": GEN - 1, "suffix": S}, "max_tokens": GEN},
    ]), extra_env=tp_env())
    binding = cpu_binding(tmp_path, "tp-reference")
    assert len(binding) == 2, binding
    cwm = Cwm(tmp_path).start()
    try:
        out = run_vllm(tmp_path, "tp-freeze", job(str(cwm.sock), [
            {"prompt": P, "max_tokens": GEN, "params": {"cwm": {"freeze_as": "tp-conv"}}},
            # Waits until both ranks' windows are durable.
            {"prompt": P[:BS], "max_tokens": 1,
             "before": f"for i in $(seq 100); do {CWM} stat tp-conv--r1 --socket {cwm.sock} "
                       f">/dev/null 2>&1 && {CWM} stat tp-conv --socket {cwm.sock} >/dev/null "
                       f"2>&1 && break; sleep 0.1; done"},
        ]), extra_env=tp_env())
        assert cpu_binding(tmp_path, "tp-freeze") == binding
        same(out[0], ref[0], "P with the connector, TP=2")
        ws = cwm.windows()
        assert {"tp-conv", "tp-conv--r1"} <= set(ws), ws
        n = len(P) + GEN - 1
        assert ws["tp-conv"]["num_tokens"] == ws["tp-conv--r1"]["num_tokens"] == n, ws
        # A fresh engine: the conversation goes on, its prefix thawed on both ranks.
        out = run_vllm(tmp_path, "tp-thaw", job(str(cwm.sock), [
            {"prompt": ref[1]["prompt"], "max_tokens": GEN},
        ]), extra_env=tp_env())
        assert cpu_binding(tmp_path, "tp-thaw") == binding
        same(out[0], ref[1], "the conversation going on, its prefix thawed, TP=2")
        assert out[0]["num_cached_tokens"] == 4 * BS
        assert cwm.metric("cwm_thaws_total") == 2, "one thaw per rank"
    finally:
        cwm.stop()
