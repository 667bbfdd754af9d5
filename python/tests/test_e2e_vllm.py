"""End to end against real vLLM (the CPU build) with `cwm serve` and CwmConnector.

One scenario in order (each test builds on the ones before, as an operator would see it):
reference outputs without cwm → freeze_as lists the window (a taken name is refused) → cwm
restarts, a fresh engine loads the prefix and its outputs equal the reference exactly → the
same through the OpenAI HTTP server with kv_transfer_params → a corrupt block restores the
valid prefix, vLLM recomputes the rest, outputs still equal → cwm killed during a freeze: vLLM
keeps serving, no partial window after restart, and a freeze while cwm is down is refused.

Every run computes on the same OpenMP threads and CPUs as the reference (checked): logprobs
are compared exactly.
"""

from __future__ import annotations

import inspect
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from cwm_env import (CWM, Cwm, _die_with_parent, block_records, cpu_binding, env, flip_byte,
                     run_vllm, same, tokens)

vllm = pytest.importorskip("vllm", reason="vLLM is installed by scripts/test.sh (scripts/vllm-env.sh)")

BS = 32
GEN = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_model import make

    w = tmp_path_factory.mktemp("e2e")
    model = make(str(w / "model"))
    P, R, S = tokens(1, 4 * BS), tokens(2, 70), tokens(3, 20)
    # Reference: no cwm. P, then R (no shared prefix), then Q = P + the 7 generated tokens
    # whose KV exists when P finishes + S: the conversation going on.
    ref = run_vllm(w, "reference", {"model": model, "socket": None, "requests": [
        {"prompt": P, "max_tokens": GEN},
        {"prompt": R, "max_tokens": GEN},
        {"prompt": {"from": 0, "generated": GEN - 1, "suffix": S}, "max_tokens": GEN},
    ]})
    state = {"dir": w, "model": model, "P": P, "R": R, "ref": ref, "Q": ref[2]["prompt"],
             "binding": cpu_binding(w, "reference"), "cwm": Cwm(w).start()}
    yield state
    state["cwm"].stop()


def run(world, name: str, requests: list[dict]) -> list[dict]:
    """A vLLM run with the cwm connector, checked to compute on the reference's threads and
    CPUs (else its logprobs could differ with nothing thawed)."""
    out = run_vllm(world["dir"], name, {"model": world["model"], "socket": str(world["cwm"].sock),
                                        "requests": requests})
    got = cpu_binding(world["dir"], name)
    assert got == world["binding"], f"{name} ran on {got}, the reference on {world['binding']}"
    return out


def wait_for(cwm: Cwm, window: str) -> str:
    """A shell command waiting (up to 10 s) until `window` is durable: how a client confirms a
    freeze reported "pending" (README)."""
    return (f"for i in $(seq 100); do {CWM} stat {window} --socket {cwm.sock} >/dev/null 2>&1 "
            f"&& break; sleep 0.1; done")


def test_connector_implements_every_abstract_method():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from cwm_vllm.connector import CwmConnector

    assert not getattr(CwmConnector, "__abstractmethods__", None), CwmConnector.__abstractmethods__
    for name in KVConnectorBase_V1.__abstractmethods__ | {
        "register_kv_caches", "get_finished", "get_block_ids_with_load_errors",
        "request_finished", "shutdown",
    }:
        base = inspect.signature(getattr(KVConnectorBase_V1, name))
        ours = inspect.signature(getattr(CwmConnector, name))
        bp = [p.name for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
        op = [p.name for p in ours.parameters.values() if p.kind is not p.VAR_KEYWORD]
        assert op == bp, f"{name}: {ours} vs base {base}"
        has_kw = lambda s: any(p.kind is p.VAR_KEYWORD for p in s.parameters.values())  # noqa: E731
        assert has_kw(ours) or not has_kw(base), f"{name} must accept **kwargs like the base"


def test_freeze_as_lists_the_window(world):
    cwm, P, R, ref = world["cwm"], world["P"], world["R"], world["ref"]
    out = run(world, "freeze", [
        {"prompt": P, "max_tokens": GEN, "params": {"cwm": {"freeze_as": "conv-1", "session": "s1"}}},
        {"prompt": R, "max_tokens": GEN},
        # The conversation goes on in the same session and is frozen again (s1 is FROZEN:
        # the connector marks it THAWED, it is live in vLLM, and freezes the new turn).
        {"prompt": {"from": 0, "generated": GEN - 1, "suffix": tokens(6, 30)}, "max_tokens": GEN,
         "params": {"cwm": {"freeze_as": "conv-1b", "session": "s1"}}},
        # A name that is taken, without "replace": refused, and said so.
        {"prompt": R, "max_tokens": GEN, "params": {"cwm": {"freeze_as": "conv-1"}},
         "before": wait_for(cwm, "conv-1")},
    ])
    same(out[0], ref[0], "P with the connector")
    same(out[1], ref[1], "R with the connector")
    same(out[3], ref[1], "R with a refused freeze")
    # Handed to cwm when the request finished, durable later.
    assert out[0]["kv_transfer_params"] == {"cwm": {"window": "conv-1", "tokens": len(P) + GEN - 1,
                                                    "status": "pending"}}
    assert out[3]["kv_transfer_params"] == {"cwm": {
        "window": "conv-1", "tokens": len(R) + GEN - 1, "status": "refused",
        "error": "ALREADY_EXISTS"}}
    ws = cwm.windows()
    assert ws["conv-1"]["version"] == 1, "the refused freeze replaced the window"
    assert set(ws) == {"conv-1", "conv-1b"}, ws
    assert ws["conv-1b"]["num_tokens"] == len(out[2]["prompt"]) + GEN - 1
    assert ws["conv-1b"]["session"] == "s1"
    from cwm_vllm.client import Client

    with Client(str(cwm.sock)) as c:
        sessions = {x["id"]: x for x in c.call("session.list")["sessions"]}
    assert sessions["s1"]["state"] == "FROZEN", sessions
    # The tokens whose KV exists when the request finishes: the prompt and all but the last
    # generated token.
    assert ws["conv-1"]["num_tokens"] == len(P) + GEN - 1
    assert ws["conv-1"]["num_blocks"] == -(-(len(P) + GEN - 1) // BS)
    assert ws["conv-1"]["session"] == "s1"


def test_fresh_engine_after_cwm_restart_loads_the_prefix(world):
    cwm = world["cwm"]
    cwm.stop()
    cwm.start()
    assert "conv-1" in cwm.windows(), "window lost across a cwm restart"
    out = run(world, "thaw", [
        # Warms the engine up (first-step costs), naming a window that does not exist.
        {"prompt": world["R"], "max_tokens": GEN, "params": {"cwm": {"thaw": "no-such-window"}}},
        {"prompt": world["Q"], "max_tokens": GEN},
    ])
    same(out[0], world["ref"][1], "R")
    assert out[0]["kv_transfer_params"] == {"cwm": {"thaw": {
        "window": "no-such-window", "status": "refused", "error": "NOT_FOUND"}}}
    out = out[1:]
    same(out[0], world["ref"][2], "Q served with the prefix from cwm")
    # 4 full blocks of the window are a prefix of Q; vLLM counts them as cached tokens.
    assert out[0]["num_cached_tokens"] == 4 * BS
    assert cwm.metric("cwm_thaws_total") == 1
    log = (world["dir"] / "thaw.log").read_text()
    # conv-1 and conv-1b (newest, chosen) both start with Q's 4 full blocks.
    assert "128 prompt tokens matched in window 'conv-1b'" in log
    assert "window 'no-such-window' not thawed: no such window (NOT_FOUND)" in log
    assert "does not start with this prompt" not in log
    world["thaw_secs"] = out[0]["secs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_openai_server_freezes_and_thaws_with_kv_transfer_params(world):
    cwm, ref = world["cwm"], world["ref"]
    port = _free_port()
    cfg = {"kv_connector": "CwmConnector", "kv_connector_module_path": "cwm_vllm.connector",
           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"socket": str(cwm.sock)}}
    log = open(world["dir"] / "http.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", world["model"],
         "--tokenizer", world["model"], "--dtype", "bfloat16", "--max-model-len", "512",
         "--enforce-eager", "--block-size", str(BS), "--max-num-seqs", "4", "--seed", "0",
         "--host", "127.0.0.1", "--port", str(port), "--kv-transfer-config", json.dumps(cfg)],
        stdout=log, stderr=subprocess.STDOUT, env=env(), preexec_fn=_die_with_parent)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (world["dir"] / "http.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "OpenAI server did not come up"
                time.sleep(1)
        thaws = cwm.metric("cwm_thaws_total")
        body = {"model": world["model"], "prompt": world["Q"], "max_tokens": GEN,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
                "kv_transfer_params": {"cwm": {"thaw": "conv-1"}}}
        r = _post(base + "/v1/completions", body)
        assert r["choices"][0]["token_ids"] == ref[2]["token_ids"]
        assert cwm.metric("cwm_thaws_total") == thaws + 1, "the HTTP request did not thaw"
        assert r.get("kv_transfer_params") == {"cwm": {"thaw": {
            "window": "conv-1", "status": "thawed", "tokens": 4 * BS}}}, r
        R2 = tokens(4, 3 * BS + 5)
        body = {"model": world["model"], "prompt": R2, "max_tokens": GEN, "temperature": 0.0,
                "ignore_eos": True, "kv_transfer_params": {"cwm": {"freeze_as": "http-1"}}}
        r = _post(base + "/v1/completions", body)
        n = len(R2) + GEN - 1
        assert r.get("kv_transfer_params") == {"cwm": {"window": "http-1", "tokens": n,
                                                       "status": "pending"}}, r
        # The freeze completes after the response: confirmed as the README says, by `cwm stat`
        # (NOT_FOUND, exit 3, until it is durable).
        subprocess.run(wait_for(cwm, "http-1"), shell=True, check=True)
        st = json.loads(cwm.cli("stat", "http-1", "--json").stdout)
        assert st["window"]["num_tokens"] == n, st
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def test_corrupt_block_and_cwm_killed_during_a_freeze(world):
    cwm, ref = world["cwm"], world["ref"]
    # Corrupt the third block of conv-1 (its first 5 block records are the log's first).
    seg, off, plen = block_records(cwm.data)[2]
    cwm.stop()
    flip_byte(seg, off + plen // 2)
    cwm.start()
    pid = cwm.proc.pid
    P3, P4 = tokens(5, 2 * BS + 9), tokens(7, 3 * BS + 1)
    LONG = 4 * GEN
    # SIGKILL is asynchronous: wait until the data directory's lock is free again (all of the
    # killed process's threads gone).
    unlocked = (f"for i in $(seq 400); do flock -n {cwm.data}/LOCK true && break; sleep 0.05; "
                f"done")
    # After the kill, cwm comes back (started by the hook, outside this test's control) while
    # the same vLLM keeps running: the connector must re-register and freeze again.
    restart = (f"setsid {CWM} serve --data-dir {cwm.data} --socket {cwm.sock} --capacity 1GiB "
               f"--segment-size 64MiB >>{cwm.log} 2>&1 < /dev/null & "
               f"for i in $(seq 100); do {CWM} health --socket {cwm.sock} >/dev/null 2>&1 && break; "
               f"sleep 0.1; done")
    # Then it goes away again (SIGTERM to the pid in its LOCK file).
    stop = (f"{wait_for(cwm, 'conv-after')}; read p _ < {cwm.data}/LOCK; kill -TERM $p; "
            f"{unlocked}")
    out = run(world, "corrupt", [
        {"prompt": world["Q"], "max_tokens": GEN, "params": {"cwm": {"thaw": "conv-1b"}}},
        # cwm is stopped once the request is under way (its name was checked) and killed
        # after it returns, with its freeze sent and unanswered; then restarted.
        {"prompt": P3, "max_tokens": LONG, "params": {"cwm": {"freeze_as": "conv-killed"}},
         "during": f"kill -STOP {pid}",
         "after": f"sleep 1; kill -KILL {pid}; {unlocked}; {restart}"},
        # Right after the restart (the scheduler's connection to the killed cwm is retried on
        # a new one at once, not backed off from).
        {"prompt": P4, "max_tokens": GEN, "params": {"cwm": {"freeze_as": "conv-after"}}},
        # cwm is down: vLLM serves, the freeze is refused.
        {"prompt": world["R"], "max_tokens": GEN, "params": {"cwm": {"freeze_as": "lost-1"}},
         "before": stop},
    ])
    # 5. Blocks 0 and 1 came from cwm, vLLM recomputed 2 and 3: outputs equal the reference.
    same(out[0], ref[2], "Q after a corrupt block")
    log = (world["dir"] / "corrupt.log").read_text()
    assert "2 of 4 blocks restored, the rest is recomputed" in log, log[-3000:]
    assert "Recovered from KV load failure" in log
    assert out[0]["kv_transfer_params"] == {"cwm": {"thaw": {
        "window": "conv-1b", "status": "thawed", "tokens": 2 * BS}}}
    # 6. vLLM kept serving while cwm was stopped, killed, restarted and stopped again.
    assert len(out[1]["token_ids"]) == LONG
    assert out[1]["kv_transfer_params"] == {"cwm": {
        "window": "conv-killed", "tokens": len(P3) + LONG - 1, "status": "pending"}}
    assert out[2]["kv_transfer_params"] == {"cwm": {
        "window": "conv-after", "tokens": len(P4) + GEN - 1, "status": "pending"}}
    same(out[3], ref[1], "R after cwm was killed")
    assert out[3]["kv_transfer_params"] == {"cwm": {
        "window": "lost-1", "tokens": len(world["R"]) + GEN - 1, "status": "refused",
        "error": "UNREACHABLE"}}
    cwm.proc.wait(timeout=10)
    cwm.proc = None
    other = int((cwm.data / "LOCK").read_text().split()[0])
    assert other != pid, "cwm was not restarted by the hook"
    cwm.start()
    ws = cwm.windows()
    assert "conv-killed" not in ws, "a freeze that was never acknowledged is visible"
    assert "lost-1" not in ws
    assert {"conv-1", "conv-1b", "http-1"} <= set(ws)
    # The connector re-registered with the restarted cwm and froze the next request.
    assert ws["conv-after"]["num_tokens"] == len(P4) + GEN - 1, ws
    # The corruption is reported, and fsck names the damaged window with its intact prefix.
    assert "corruption" in (world["dir"] / "cwm.log").read_text().lower()
    cwm.stop()
    fsck = subprocess.run([str(CWM), "fsck", "--data-dir", str(cwm.data), "--json"],
                          capture_output=True, text=True)
    assert fsck.returncode == 5, fsck.stdout + fsck.stderr
    rep = json.loads(fsck.stdout)
    damaged = [w for w in rep["windows"] if w["name"] == "conv-1"][0]
    assert damaged["status"] == "damaged" and damaged["intact_blocks"] == 2, damaged
    cwm.start()
