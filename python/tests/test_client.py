"""The Python client against a real `cwm serve`: typed errors, reconnect after a restart, and
a full round trip of this process's own memory (vLLM's CPU layout) through register (layout
kind `pieces`, process memory), lookup (with the thaw-or-recompute estimate), freeze and a
prefix thaw into other blocks."""

import ctypes
import os

import pytest

torch = pytest.importorskip("torch")

from cwm_env import Cwm  # noqa: E402
from cwm_vllm.client import Client, CwmError, CwmUnavailable, ERRORS  # noqa: E402
from cwm_vllm.layout import describe, layout_request  # noqa: E402

NB, BS, H, D, L = 32, 16, 2, 32, 2


@pytest.fixture()
def cwm(tmp_path):
    c = Cwm(tmp_path).start()
    yield c
    c.stop()


def test_typed_errors_and_reconnect(cwm):
    c = Client(str(cwm.sock))
    assert c.hello()["protocol"] == 1
    with pytest.raises(ERRORS["NOT_FOUND"]) as e:
        c.stat("nope")
    assert e.value.code == "NOT_FOUND" and isinstance(e.value, CwmError)
    with pytest.raises(ERRORS["UNKNOWN_OP"]):
        c.call("frobnicate")
    with pytest.raises(ERRORS["VALIDATION"]):
        c.call("stat", window=7)
    assert c.health()["status"] == "ok"  # the connection survives error answers
    cwm.stop()
    with pytest.raises(CwmUnavailable):
        c.health()
    cwm.start()
    assert c.health()["status"] == "ok"  # reconnected
    with pytest.raises(CwmUnavailable):
        Client(str(cwm.sock) + ".missing").hello()


def test_process_memory_round_trip_with_prefix_thaw(cwm):
    buf = torch.randn(L, NB, H, BS, 2 * D).to(torch.bfloat16)
    layers = [buf[i] for i in range(L)]
    d = describe(layers, NB)
    reg = {"engine": "py", "model": "tiny", "layout": layout_request(
        d, layers=L, block_size=BS, heads=H, head=D, name="vllm-cpu-test"),
        "memory": {"process": {"pid": os.getpid(),
                               "tensors": [[r.base, r.nbytes] for r in d.regions]}},
        "scope": "connection"}
    c = Client(str(cwm.sock), on_connect=lambda cl: cl.call("register", **reg))
    c.connect()
    toks = list(range(100, 100 + 5 * BS))  # 5 full blocks
    src = [3, 9, 4, 20, 11]
    before = [buf[:, b].clone() for b in src]
    captured = []
    r = c.freeze("py", "w1", toks, src, on_captured=captured.append)
    assert r["status"] == "durable" and captured and captured[0]["status"] == "captured"
    # lookup: a longer prompt starting with the window's tokens.
    prompt = toks + [7] * (2 * BS)
    lk = c.lookup("py", prompt)
    assert lk["tokens_matched"] == 5 * BS and lk["window"] == "w1" and lk["thaw_wins"]
    assert lk["estimated_thaw_secs"] > 0 and lk["estimated_recompute_secs"] is None
    slow = c.lookup("py", prompt, prefill_tokens_per_s=1e12)
    assert not slow["thaw_wins"] and slow["estimated_recompute_secs"] < slow["estimated_thaw_secs"]
    assert c.lookup("py", [1, 2, 3] * 40)["tokens_matched"] == 0
    # Prefix thaw of window blocks 2..4 into other blocks, without naming the window.
    buf[:, 25:28] = 0
    r = c.thaw("py", [25, 26, 27], tokens=prompt[: 5 * BS], prefix=True, first_block=2)
    assert r["report"]["blocks_restored"] == 3 and r["report"]["tokens_to_recompute"] == 0
    for i, b in enumerate([25, 26, 27]):
        assert torch.equal(buf[:, b], before[2 + i]), f"block {b}"
    # A prompt that differs inside the range: TOKEN_MISMATCH, nothing written.
    buf[:, 30] = 0
    bad = list(prompt)
    bad[3] += 1
    with pytest.raises(ERRORS["TOKEN_MISMATCH"]):
        c.thaw("py", [30], window="w1", tokens=bad[: BS], prefix=True)
    assert torch.count_nonzero(buf[:, 30].float()) == 0
    c.close()
