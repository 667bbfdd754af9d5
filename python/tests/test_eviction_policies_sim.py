"""bench/eviction_policies.py (the candidates docs/PERFORMANCE.md's eviction section reports on)
simulates the store's window model: its LRU must be `cwm bench trace`'s LRU to the last digit
on the Mooncake trace and on both synthetic traces the binary generates, or its other columns
compare with the wrong baseline."""

import importlib.util
import json
import subprocess

from cwm_env import CWM, ROOT


def load():
    spec = importlib.util.spec_from_file_location("eviction_policies",
                                                  ROOT / "bench" / "eviction_policies.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rust_lru(*args):
    out = subprocess.run([str(CWM), "bench", "trace", *args, "--replay-at", "0.1", "--json"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    return {p["capacity_fraction"]: p["lru"]["block_ratio"] for p in json.loads(out)["points"]}


def test_the_python_lru_is_the_store_simulations_lru():
    sim = load()
    trace = ROOT / "bench" / "traces" / "mooncake-synthetic.jsonl"
    cases = [(sim.load(trace), ["--trace", str(trace)])]
    cases += [(sim.synthetic(k), ["--synthetic", k]) for k in ("agents", "chats")]
    for reqs, args in cases:
        rust = rust_lru(*args)
        unique = len({k for r in reqs for k in r})
        assert sorted(rust) == list(sim.FRACTIONS), rust
        for f, want in rust.items():
            got = sim.simulate(reqs, int(unique * f), "lru")
            assert abs(got - want) < 1e-12, (args, f, got, want)


def test_root_history_protects_repeated_roots_and_is_not_lru():
    sim = load()
    # Root 1 recurs; roots 10, 20, … appear once. At a capacity of a few windows, LRU loses
    # root 1 between its uses; the history keeps it.
    reqs = []
    for i in range(60):
        reqs.append([1, 2, 3, 4, 1000 + i] if i % 4 == 0 else [10 * (i + 1), 10 * (i + 1) + 1])
    lru = sim.simulate(reqs, 12, "lru")
    hist = sim.simulate(reqs, 12, "root-history")
    assert hist > lru, (hist, lru)


def test_fork_protects_a_document_asked_twice_but_not_a_growing_conversation():
    sim = load()
    # Document 1-2-3-4 asked different questions (a fork after block 4) every fourth request,
    # one-off prompts between: the fork keeps the document where LRU loses it.
    reqs = []
    for i in range(60):
        reqs.append([1, 2, 3, 4, 1000 + i] if i % 4 == 0 else [10 * (i + 1), 10 * (i + 1) + 1])
    assert sim.simulate(reqs, 12, "fork") > sim.simulate(reqs, 12, "lru")
    # Conversations that only grow (each turn extends the last, no shared root) never fork:
    # the fork policies are LRU there, where root-history is not.
    chats = sim.synthetic("solo-chats", 600, seed=3)
    unique = len({k for r in chats for k in r})
    for f in (0.05, 0.25):
        lru = sim.simulate(chats, int(unique * f), "lru")
        assert sim.simulate(chats, int(unique * f), "fork") == lru
        assert sim.simulate(chats, int(unique * f), "fork-bonus") == lru


def test_segment_order_copies_only_what_stays_referenced():
    sim = load()
    # Distinct prompts, no shared block: reclaiming the log in write order copies nothing,
    # and with nothing ever hit, clock has nothing to give a second chance to.
    solo = [[100 * i + j for j in range(4)] for i in range(50)]
    for p in ("segment-fifo", "segment-clock"):
        st = {}
        sim.simulate(solo, 40, p, stats=st)
        assert st == {"copied": 0, "written": 200}, (p, st)
    # A system prompt (blocks 1, 2) shared by every request: each time the window that wrote
    # it is reclaimed, its two blocks are copied forward; the hit ratio stays LRU's.
    shared = [[1, 2, 1000 + i] for i in range(50)]
    st = {}
    fifo = sim.simulate(shared, 12, "segment-fifo", stats=st)
    assert st["copied"] > 0 and st["copied"] % 2 == 0, st
    assert fifo == sim.simulate(shared, 12, "lru"), fifo


def test_lru_with_compaction_copies_what_log_order_would_not():
    sim = load()
    # No request hits: LRU evicts in write order too, yet each pass stops inside a segment and
    # the compaction after it copies that segment's live rest, pass after pass.
    solo = [[100 * i + j for j in range(4)] for i in range(400)]
    lru, fifo = {}, {}
    assert sim.simulate(solo, 400, "lru", stats=lru) == 0.0
    assert sim.simulate(solo, 400, "segment-fifo", stats=fifo) == 0.0
    assert fifo["copied"] == 0, fifo
    assert lru["copied"] > lru["written"], lru
