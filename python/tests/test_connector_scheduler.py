"""CwmConnector's scheduler side against a real `cwm serve` (no engine process needed): prefix
matching and its limits, the blocks a load goes to, the thaw-or-recompute decision with stated
and measured prefill rates, freeze on finish, and serving on when cwm is down."""

import logging
import os
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402

from cwm_env import Cwm  # noqa: E402
from cwm_vllm.client import Client  # noqa: E402
from cwm_vllm.connector import CwmConnector  # noqa: E402
from cwm_vllm.layout import describe, layout_request  # noqa: E402

NB, BS, H, D, L = 32, 16, 2, 32, 2
T = list(range(500, 500 + 5 * BS))  # 5 full blocks


def connector(sock, **extra):
    kv = KVTransferConfig(kv_connector="CwmConnector", kv_role="kv_both",
                          kv_load_failure_policy="recompute",
                          kv_connector_extra_config={"socket": str(sock), **extra})
    cfg = SimpleNamespace(kv_transfer_config=kv, cache_config=SimpleNamespace(block_size=BS),
                          model_config=SimpleNamespace(model="tiny", dtype="bfloat16"))
    return CwmConnector(cfg, KVConnectorRole.SCHEDULER, None), kv.engine_id


def request(prompt, params=None, computed=0, rid="r1"):
    return SimpleNamespace(request_id=rid, prompt_token_ids=prompt, all_token_ids=prompt,
                           kv_transfer_params=params, num_computed_tokens=computed)


@pytest.fixture()
def world(tmp_path):
    cwm = Cwm(tmp_path).start()
    buf = torch.randn(L, NB, H, BS, 2 * D).to(torch.bfloat16)
    d = describe([buf[i] for i in range(L)], NB)
    conn, engine_id = connector(cwm.sock, prefill_tokens_per_s="off")
    reg = {"engine": f"vllm-{engine_id}-r0", "model": "tiny:bfloat16",
           "layout": layout_request(d, layers=L, block_size=BS, heads=H, head=D, name="t"),
           "memory": {"process": {"pid": os.getpid(),
                                  "tensors": [[r.base, r.nbytes] for r in d.regions]}}}
    c = Client(str(cwm.sock))
    c.call("register", **reg)
    c.freeze(reg["engine"], "w", T, [1, 2, 3, 4, 5])
    yield SimpleNamespace(cwm=cwm, conn=conn, engine_id=engine_id, client=c, reg=reg, buf=buf)
    c.close()
    cwm.stop()


def test_matches_loads_and_limits(world):
    conn = world.conn
    assert conn.get_num_new_matched_tokens(request(T + [1] * 10), 0) == (5 * BS, True)
    # Part of the prefix already computed locally: only the rest comes from cwm.
    assert conn.get_num_new_matched_tokens(request(T + [1] * 10), 2 * BS) == (3 * BS, True)
    blocks = SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13, 14, 15],))
    conn.update_state_after_alloc(request(T + [1] * 10), blocks, 3 * BS)
    meta = conn.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=0))
    (load,) = meta.loads
    assert (load.window, load.first_block, load.block_ids) == ("w", 2, [12, 13, 14])
    assert load.tokens == T
    assert conn.build_connector_meta(SimpleNamespace()).loads == []
    # The whole prompt stored: vLLM must still compute its last token, so one block less.
    assert conn.get_num_new_matched_tokens(request(T, rid="r2"), 0) == (4 * BS, True)
    # Nothing stored for this prompt; a required window that does not match.
    assert conn.get_num_new_matched_tokens(request([9] * 100, rid="r3"), 0) == (0, False)
    assert conn.get_num_new_matched_tokens(
        request(T + [1], {"cwm": {"thaw": "other"}}, rid="r4"), 0) == (0, False)
    assert conn.get_num_new_matched_tokens(
        request(T + [1], {"cwm": {"thaw": "w"}}, rid="r5"), 0) == (5 * BS, True)
    assert conn.get_num_new_matched_tokens(
        request(T + [1], {"cwm": {"load": False}}, rid="r6"), 0) == (0, False)


def test_thaw_or_recompute(world):
    # A stated prefill rate far above what any disk can match: recompute.
    fast, _ = connector(world.cwm.sock, prefill_tokens_per_s=1e12)
    fast._engine_base = f"vllm-{world.engine_id}"
    assert fast.get_num_new_matched_tokens(request(T + [1]), 0) == (0, False)
    # ... unless the request names the window: then it is required.
    assert fast.get_num_new_matched_tokens(
        request(T + [1], {"cwm": {"thaw": "w"}}, rid="req"), 0) == (5 * BS, True)
    slow, _ = connector(world.cwm.sock, prefill_tokens_per_s=1.0)
    slow._engine_base = f"vllm-{world.engine_id}"
    assert slow.get_num_new_matched_tokens(request(T + [1]), 0) == (5 * BS, True)
    # Measured: a 1,000-token step taking ≥ 10 ms; the decision follows cwm's estimate.
    m, _ = connector(world.cwm.sock)
    m._engine_base = f"vllm-{world.engine_id}"
    assert m.prefill_tokens_per_s is None
    # The engine's first prefill step (its warm-up) is not a rate.
    m.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=1000))
    m.update_connector_output(KVConnectorOutput())
    assert m.prefill_tokens_per_s is None
    m.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=1000))
    time.sleep(0.01)
    m.update_connector_output(KVConnectorOutput())
    rate = m.prefill_tokens_per_s
    assert rate is not None and 0 < rate <= 1000 / 0.01
    lk = world.client.lookup(f"vllm-{world.engine_id}-r0", T, prefill_tokens_per_s=rate)
    want = (5 * BS, True) if lk["thaw_wins"] else (0, False)
    assert m.get_num_new_matched_tokens(request(T + [1]), 0) == want
    # Small steps (decode) do not count.
    m.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=4))
    m.update_connector_output(KVConnectorOutput())
    assert m.prefill_tokens_per_s == rate
    # Asynchronous scheduling: step N+1 (tiny) is scheduled before step N's output; N's
    # tokens are still measured against N's own time.
    m.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=2000))
    time.sleep(0.01)
    m.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=4))
    m.update_connector_output(KVConnectorOutput())
    after = m.prefill_tokens_per_s
    assert after != rate and 0.8 * rate < after <= 0.8 * rate + 0.2 * 2000 / 0.01
    m.update_connector_output(KVConnectorOutput())
    assert m.prefill_tokens_per_s == after, "the small step does not count"


def test_freeze_on_finish(world):
    conn = world.conn
    req = request(T + [7, 8, 9], {"cwm": {"freeze_as": "next", "session": "s"}}, computed=5 * BS + 2)
    assert conn.request_finished(req, [4, 5, 6, 7, 8, 9, 10]) == (
        True, {"cwm": {"window": "next", "tokens": 5 * BS + 2, "status": "pending"}})
    (save,) = conn.build_connector_meta(SimpleNamespace()).saves
    assert save.block_ids == [4, 5, 6, 7, 8, 9] and save.tokens == (T + [7, 8])
    assert save.session == "s"
    assert conn.request_finished(request(T), [1, 2]) == (False, None)


def test_cwm_down_serves_without_it(world, caplog):
    down, _ = connector(str(world.cwm.sock) + ".gone")
    for i in range(3):
        assert down.get_num_new_matched_tokens(request(T + [1], rid=f"x{i}"), 0) == (0, False)


class Logged(logging.Handler):
    """The connector's log lines (vLLM's loggers do not propagate to pytest's caplog)."""

    def __enter__(self):
        self.lines = []
        logging.getLogger("vllm.cwm_connector").addHandler(self)
        return self

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __exit__(self, *exc):
        logging.getLogger("vllm.cwm_connector").removeHandler(self)

    @property
    def text(self):
        return "\n".join(self.lines)


def test_a_freeze_that_cannot_happen_is_refused_visibly(world):
    """The finished request's kv_transfer_params say whether its freeze_as was handed on
    ("pending") or refused, with the code: a taken name without "replace" (ALREADY_EXISTS,
    checked when the request is first seen) or cwm unreachable. They used to report the window
    either way."""
    conn = world.conn
    n = 5 * BS + 2
    blocks = [4, 5, 6, 7, 8, 9, 10]

    def finish(c, params, rid, seen=True):
        req = request(T + [7, 8, 9], {"cwm": params}, computed=n, rid=rid)
        if seen:  # the scheduler sees a request (and checks its name) before it runs
            c.get_num_new_matched_tokens(req, 0)
        return c.request_finished(req, blocks)

    with Logged() as log:
        assert finish(conn, {"freeze_as": "w"}, "dup") == (False, {"cwm": {
            "window": "w", "tokens": n, "status": "refused", "error": "ALREADY_EXISTS"}})
    assert "'w' not frozen (ALREADY_EXISTS)" in log.text, log.text
    assert conn.build_connector_meta(SimpleNamespace()).saves == []
    # With "replace": handed on, naming the version it replaces (a client confirms the
    # freeze when `stat` shows a newer one).
    assert finish(conn, {"freeze_as": "w", "replace": True}, "rep") == (True, {"cwm": {
        "window": "w", "tokens": n, "status": "pending", "replaces": 1}})
    # A free name is checked when the request is first seen: cwm going away afterwards does
    # not hold the scheduler up at the finish (the worker's freeze finds out).
    req = request(T + [7, 8, 9], {"cwm": {"freeze_as": "new"}}, computed=n, rid="new")
    conn.get_num_new_matched_tokens(req, 0)
    assert [s.window for s in conn.build_connector_meta(SimpleNamespace()).saves] == ["w"]
    world.cwm.stop()
    t0 = time.monotonic()
    assert conn.request_finished(req, blocks) == (True, {"cwm": {
        "window": "new", "tokens": n, "status": "pending"}})
    assert time.monotonic() - t0 < 0.5
    # cwm unreachable: refused with the client library's code, whether or not seen before.
    down, _ = connector(str(world.cwm.sock) + ".gone")
    for seen in (True, False):
        assert finish(down, {"freeze_as": "lost-1"}, f"lost-{seen}", seen) == (False, {"cwm": {
            "window": "lost-1", "tokens": n, "status": "refused", "error": "UNREACHABLE"}})
    assert down.build_connector_meta(SimpleNamespace()).saves == []


def test_a_named_thaw_says_what_became_of_it(world):
    """A window named to thaw that does not exist is NOT_FOUND (in the log and in the
    kv_transfer_params; it used to be logged as "does not start with this prompt"), one that
    does not start with the prompt TOKEN_MISMATCH; a used one reports the tokens restored from
    it, fewer when a block failed to load."""
    conn = world.conn
    with Logged() as log:
        r = request(T + [1], {"cwm": {"thaw": "no-such-window"}}, rid="t1")
        assert conn.get_num_new_matched_tokens(r, 0) == (0, False)
        assert conn.request_finished(r, [1, 2]) == (False, {"cwm": {"thaw": {
            "window": "no-such-window", "status": "refused", "error": "NOT_FOUND"}}})
    assert "window 'no-such-window' not thawed: no such window (NOT_FOUND)" in log.text, log.text
    assert "does not start" not in log.text
    with Logged() as log:
        r = request([9] * 100, {"cwm": {"thaw": "w", "freeze_as": "other"}}, computed=99,
                    rid="t2")
        assert conn.get_num_new_matched_tokens(r, 0) == (0, False)
        assert conn.request_finished(r, [1, 2, 3, 4, 5, 6, 7]) == (True, {"cwm": {
            "window": "other", "tokens": 99, "status": "pending",
            "thaw": {"window": "w", "status": "refused", "error": "TOKEN_MISMATCH"}}})
    assert "window 'w' not thawed: it does not start with this prompt (TOKEN_MISMATCH)" in \
        log.text, log.text
    # Used: 3 blocks restored from cwm (2 were computed locally); then a load whose second
    # block failed restored one block's tokens.
    for rid, bad, restored in (("t3", set(), 3 * BS), ("t4", {13}, BS)):
        r = request(T + [1] * 10, {"cwm": {"thaw": "w"}}, rid=rid)
        assert conn.get_num_new_matched_tokens(r, 2 * BS) == (3 * BS, True)
        conn.update_state_after_alloc(
            r, SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13, 14, 15],)), 3 * BS)
        conn.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=0))
        conn.update_connector_output(KVConnectorOutput(finished_recving={rid},
                                                       invalid_block_ids=bad))
        assert conn.request_finished(r, [10, 11, 12, 13, 14, 15]) == (False, {"cwm": {
            "thaw": {"window": "w", "status": "thawed", "tokens": restored}}})
    # cwm unreachable.
    down, _ = connector(str(world.cwm.sock) + ".gone")
    r = request(T + [1], {"cwm": {"thaw": "w"}}, rid="t5")
    assert down.get_num_new_matched_tokens(r, 0) == (0, False)
    assert down.request_finished(r, [1])[1] == {"cwm": {"thaw": {
        "window": "w", "status": "refused", "error": "UNREACHABLE"}}}


def test_the_scheduler_reconnects_at_once_after_a_cwm_restart(world):
    """A connection cwm closed (it restarted) is retried once on a new one: a restart does not
    make the scheduler back off (and refuse freezes as UNREACHABLE meanwhile)."""
    conn = world.conn
    assert conn.get_num_new_matched_tokens(request(T + [1], rid="a"), 0) == (5 * BS, True)
    world.cwm.stop()
    world.cwm.start()
    world.client.close()
    world.client.call("register", **world.reg)
    assert conn.get_num_new_matched_tokens(request(T + [1], rid="b"), 0) == (5 * BS, True)
    assert conn._down_until == 0.0


def test_each_parallel_rank_has_its_own_window():
    from cwm_vllm.worker import CwmWorker

    assert CwmWorker("s", "e", "m").window_name("conv") == "conv"
    assert CwmWorker("s", "e", "m", rank=3).window_name("conv") == "conv--r3"


def test_parallel_ranks_never_share_blocks(world):
    """Tensor-parallel ranks hold different slices of the same tokens' KV in tensors of the
    same shape: their blocks must not deduplicate against each other, or a rank would thaw
    another rank's heads."""
    from cwm_vllm.worker import CwmWorker, LoadSpec, SaveSpec

    # Not the fixture's tokens T: the same model's KV for the same tokens is rightly shared.
    tokens = list(range(9000, 9000 + 4 * BS))
    ranks = []
    for rank in (0, 1):
        buf = torch.randn(L, NB, H, BS, 2 * D).to(torch.bfloat16)
        w = CwmWorker(str(world.cwm.sock), f"tp-r{rank}", "tiny:bfloat16", rank=rank)
        w.register([buf[i] for i in range(L)], NB, BS, H, D)
        ranks.append((w, buf))
    for w, _ in ranks:
        assert w.save(SaveSpec("q", "tp", tokens, [4, 5, 6, 7])) is not None
    for w, buf in ranks:
        want = buf[:, 4:8].clone()
        buf[:, 20:24] = 0
        failed, rep = w.load(LoadSpec("q", "tp", tokens, 0, [20, 21, 22, 23]))
        assert failed == [] and rep["blocks_restored"] == 4, rep
        assert torch.equal(buf[:, 20:24], want), f"rank {w.rank} thawed another rank's KV"
    for w, _ in ranks:
        w.close()


def test_worker_registers_again_after_a_cwm_restart(world):
    from cwm_vllm.worker import CwmWorker

    buf = torch.randn(L, NB, H, BS, 2 * D).to(torch.bfloat16)
    w = CwmWorker(str(world.cwm.sock), "kept", "tiny:bfloat16")
    w.register([buf[i] for i in range(L)], NB, BS, H, D)
    w.keep_registered(interval=0.1)

    def engines():
        with Client(str(world.cwm.sock)) as c:
            return c.health()["engines"]

    assert engines() == 2  # the fixture's engine and this one
    world.cwm.stop()
    world.cwm.start()  # registrations do not survive a restart: only the kept one comes back
    deadline = time.monotonic() + 10
    while engines() != 1:
        assert time.monotonic() < deadline, "the worker did not register again"
        time.sleep(0.1)
    w.close()


def test_namespace_follows_the_weights_not_the_path(tmp_path):
    """Same weights anywhere share blocks; weights rewritten in place never meet stale KV."""
    import shutil

    from cwm_vllm.connector import namespace
    from tiny_model import make

    a = make(str(tmp_path / "a"))
    shutil.copytree(a, tmp_path / "b")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    ns = namespace(a, "bfloat16")
    assert ns.startswith("weights-") and ns.endswith(":bfloat16"), ns
    assert namespace(str(tmp_path / "b"), "bfloat16") == ns, "a copy is the same model"
    assert namespace(str(tmp_path / "link"), "bfloat16") == ns
    assert namespace(a, "float16") != ns
    # Weights saved over the old files, with one matrix changed (a LoRA merged into it).
    from safetensors.torch import load_file, save_file

    f = tmp_path / "b" / "model.safetensors"
    w = load_file(str(f))
    save_file(w, str(f), metadata={"format": "pt"})  # same bytes, as save_file lays them out
    before = namespace(str(tmp_path / "b"), "bfloat16")
    q = "model.layers.0.self_attn.q_proj.weight"  # no fixed sample of the file falls in it
    w[q] = w[q] + 1
    save_file(w, str(f), metadata={"format": "pt"})
    assert namespace(str(tmp_path / "b"), "bfloat16") != before, "stale KV after a model change"
    # No weight files: the real path; a Hub id that is not downloaded: the id (and revision).
    (tmp_path / "empty").mkdir()
    assert namespace(str(tmp_path / "empty"), "bfloat16") == f"{tmp_path / 'empty'}:bfloat16"
    assert namespace("nobody/not-a-model-xyz", "bfloat16") == "nobody/not-a-model-xyz:bfloat16"
    assert namespace("nobody/not-a-model-xyz", "bfloat16", revision="abc") == \
        "nobody/not-a-model-xyz@abc:bfloat16"
    assert namespace(a, "bfloat16", model_id="llama-8b") == "llama-8b:bfloat16"


def test_worker_bookkeeping_reports_each_transfer_once():
    from cwm_vllm.connector import CwmConnectorMetadata
    from cwm_vllm.worker import LoadSpec, SaveSpec

    kv = KVTransferConfig(kv_connector="CwmConnector", kv_role="kv_both",
                          kv_connector_extra_config={"socket": "/nonexistent"})
    cfg = SimpleNamespace(kv_transfer_config=kv, cache_config=SimpleNamespace(block_size=BS),
                          model_config=SimpleNamespace(model="tiny", dtype="bfloat16"))
    w = CwmConnector(cfg, KVConnectorRole.WORKER, None)  # never registered: cwm is "down"
    w.bind_connector_metadata(CwmConnectorMetadata(
        loads=[LoadSpec("l1", "w", [1] * BS, 0, [7, 8])],
        saves=[SaveSpec("s1", "w2", [1] * BS, [3])]))
    w.start_load_kv(None)
    w.wait_for_save()
    # The load failed (no cwm): reported finished with its blocks as load errors, once.
    assert w.get_finished(set()) == (None, {"l1"})
    assert w.get_block_ids_with_load_errors() == {7, 8}
    assert w.get_block_ids_with_load_errors() == set()
    # The save is released (blocks freed) only once vLLM said the request finished, once.
    assert w.get_finished({"other-1", "other-2"}) == (None, None)
    assert w.get_finished({"s1"}) == ({"s1"}, None)
    assert w.get_finished({"s1"}) == (None, None)
    # Finished ids of requests without a save are not kept.
    assert w._finished_seen == set() and w._saving == set() and w._sent == set()


def test_lora_cache_salt_and_multimodal_requests_keep_their_kv_apart(world):
    """The same tokens' KV differs per LoRA adapter, tenant salt and image: such requests
    neither match plain windows nor share blocks with each other, and a window frozen under
    one salt is never thawed under another."""
    from cwm_vllm.connector import request_salt
    from cwm_vllm.worker import CwmWorker, LoadSpec, SaveSpec

    def req(rid, **kw):
        r = request(T + [1] * 10, rid=rid)
        r.__dict__.update(kw)
        return r

    img = lambda h, off: SimpleNamespace(modality="image", mm_hash=h, identifier=h,  # noqa: E731
                                         mm_position=SimpleNamespace(offset=off, length=8))
    lora = lambda name: SimpleNamespace(lora_name=name, lora_int_id=1,  # noqa: E731
                                        lora_path="/nonexistent")
    plain = req("p")
    salted = {
        "lora a": req("a", lora_request=lora("a")),
        "lora b": req("b", lora_request=lora("b")),
        "tenant": req("t", cache_salt="tenant-1"),
        "image x": req("x", mm_features=[img("x", 0)]),
        "image y": req("y", mm_features=[img("y", 0)]),
        "image x later": req("x2", mm_features=[img("x", 16)]),
    }
    assert request_salt(plain) is None
    salts = {k: request_salt(r) for k, r in salted.items()}
    assert len(set(salts.values())) == len(salts), salts
    assert request_salt(req("a2", lora_request=lora("a"))) == salts["lora a"]
    # The fixture's window "w" holds T's KV of the plain model: found by a plain request only.
    assert world.conn.get_num_new_matched_tokens(plain, 0) == (5 * BS, True)
    for k, r in salted.items():
        assert world.conn.get_num_new_matched_tokens(r, 0) == (0, False), k
    # Prompt embeddings: KV not a function of token ids; neither loaded nor frozen.
    emb = req("e", prompt_embeds=torch.zeros(3, 4))
    assert world.conn.get_num_new_matched_tokens(emb, 0) == (0, False)
    emb.kv_transfer_params = {"cwm": {"freeze_as": "emb"}}
    assert world.conn.request_finished(emb, [1, 2, 3, 4, 5, 6]) == (False, {"cwm": {
        "window": "emb", "tokens": 0, "status": "refused", "error": "VALIDATION"}})
    # Frozen under a salt: found and thawed under that salt only.
    buf = torch.randn(L, NB, H, BS, 2 * D).to(torch.bfloat16)
    w = CwmWorker(str(world.cwm.sock), f"vllm-{world.engine_id}-r0", "tiny:bfloat16")
    w.register([buf[i] for i in range(L)], NB, BS, H, D)
    s = salts["lora a"]
    assert w.save(SaveSpec("q", "with-lora", T, [8, 9, 10, 11, 12], salt=s))["ok"]
    m = world.conn.get_num_new_matched_tokens(req("a3", lora_request=lora("a")), 0)
    assert m == (5 * BS, True)
    assert world.conn.get_num_new_matched_tokens(req("b3", lora_request=lora("b")), 0) == \
        (0, False)
    want = buf[:, 8:13].clone()
    failed, _ = w.load(LoadSpec("q", "with-lora", T, 0, [20, 21, 22, 23, 24], salt=salts["lora b"]))
    assert failed == [20, 21, 22, 23, 24], "thawed under another adapter's salt"
    from cwm_vllm.client import NamespaceMismatch

    with pytest.raises(NamespaceMismatch):  # nor by name without the adapter
        world.client.thaw(w.engine, [20, 21, 22, 23, 24], window="with-lora", prefix=True)
    failed, rep = w.load(LoadSpec("q", "with-lora", T, 0, [20, 21, 22, 23, 24], salt=s))
    assert failed == [] and torch.equal(buf[:, 20:25], want), rep
    w.close()


def test_a_request_finished_while_loading_is_not_frozen(world):
    """Aborted while its KV loads: vLLM keeps its blocks until the load ends, then frees the
    request; a freeze then would read blocks still being written and report a request vLLM no
    longer knows (its scheduler asserts on it)."""
    conn = world.conn
    req = request(T + [1] * 10, {"cwm": {"freeze_as": "after"}}, computed=0, rid="ab")
    assert conn.get_num_new_matched_tokens(req, 0) == (5 * BS, True)
    blocks = SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13, 14, 15],))
    conn.update_state_after_alloc(req, blocks, 5 * BS)
    conn.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=0))
    req.num_computed_tokens = 5 * BS
    assert conn.request_finished(req, [10, 11, 12, 13, 14, 15]) == (False, {"cwm": {
        "window": "after", "tokens": 5 * BS, "status": "refused", "error": "INTERRUPTED"}})
    assert conn.build_connector_meta(SimpleNamespace()).saves == []
    # Once its load is reported finished, a request of that id freezes normally again.
    conn.update_connector_output(KVConnectorOutput(finished_recving={"ab"}))
    assert conn.request_finished(req, [10, 11, 12, 13, 14, 15])[0] is True


def test_a_stalled_cwm_is_asked_less_and_less_often(world, monkeypatch):
    down, _ = connector(str(world.cwm.sock) + ".gone")
    now = [1000.0]
    monkeypatch.setattr("cwm_vllm.connector.time.monotonic", lambda: now[0])
    waits = []
    for i in range(5):
        down.get_num_new_matched_tokens(request(T + [1], rid=f"y{i}"), 0)
        waits.append(down._down_until - now[0])
        now[0] = down._down_until + 0.001
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0], waits


def test_saves_are_known_before_wait_for_save_with_speculative_decoding():
    """With speculative decoding vLLM asks for finished transfers (naming the requests that
    finished) before wait_for_save: a save must be remembered from the moment its metadata is
    bound, or its finished id is dropped and its blocks are never freed."""
    from cwm_vllm.connector import CwmConnectorMetadata
    from cwm_vllm.worker import SaveSpec

    kv = KVTransferConfig(kv_connector="CwmConnector", kv_role="kv_both",
                          kv_connector_extra_config={"socket": "/nonexistent"})
    cfg = SimpleNamespace(kv_transfer_config=kv, cache_config=SimpleNamespace(block_size=BS),
                          model_config=SimpleNamespace(model="tiny", dtype="bfloat16"))
    w = CwmConnector(cfg, KVConnectorRole.WORKER, None)
    w.bind_connector_metadata(CwmConnectorMetadata(
        loads=[], saves=[SaveSpec("s1", "w2", [1] * BS, [3])]))
    # defer_finalize: the results first, then wait_for_save.
    assert w.get_finished({"s1"}) == (None, None)
    w.wait_for_save()
    assert w.get_finished(set()) == ({"s1"}, None)
    assert w._finished_seen == set() and w._saving == set() and w._sent == set()
