#!/usr/bin/env python3
"""Eviction-policy candidates at window granularity, simulated on request traces.

The same model as `cwm bench trace`'s window simulation (src/bin/cwm/tools/trace.rs): every
request is saved as an unnamed window of its prompt blocks (deduplicated, reference-counted),
a request hits its longest stored prefix, and above the high watermark (0.95 of the capacity)
whole windows are evicted in policy order down to the low one (0.90). Its `lru` column equals
the Rust simulation's (tests/cli_bench_trace_policies.py checks it). The other policies are the
candidates docs/PERFORMANCE.md ("Eviction") reports on; none is in the store, because none
beats LRU on every trace. `segment-fifo` / `segment-clock` evict in the log's write order (what
would let the store reclaim whole segments) and also count the blocks they copy forward.

Usage: bench/eviction_policies.py [--trace FILE] [--only KIND] [--phases] [--json]
Traces: FILE (Mooncake JSONL, `hash_ids`), and the synthetic ones: `agents` and `chats` (the
generators of `cwm bench trace --synthetic`, seed 7, 4,000 requests), `solo-chats` (chats with
no shared system prompt: each conversation its own root). `--phases` (with `--trace`) adds two
traces whose workload changes half-way: FILE's first 2,000 requests then 2,000 solo chats
(seed 11), and the other way round — a policy that protects what was valuable must let it go
when the workload moves on.
"""
import argparse
import collections
import json
import sys

MASK = (1 << 64) - 1
SEG = 64  # blocks per segment in LRU's copy count (stats only)
COMPACT_LIVE = 0.9  # segments under this live ratio are compacted after an eviction
FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5)


class Rng:
    """splitmix64, as src/prng.rs."""

    def __init__(self, seed):
        self.x = seed

    def below(self, n):
        self.x = (self.x + 0x9E3779B97F4A7C15) & MASK
        z = self.x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return 0 if n == 0 else (z ^ (z >> 31)) % n


def synthetic(kind, n=4000, seed=7):
    r = Rng(seed | 1)
    nid = [1_000_000]

    def fresh(k):
        out = []
        for _ in range(k):
            nid[0] += 1
            out.append(nid[0])
        return out

    out = []
    if kind == "agents":
        tools = [fresh(24) for _ in range(3)]
        convs = []
        while len(out) < n:
            if not convs or r.below(8) == 0:
                convs.append(list(tools[r.below(3)]) + fresh(1 + r.below(3)))
            else:
                i = len(convs) - 1 - r.below(min(len(convs), 24))
                convs[i] += fresh(1 + r.below(2))
            last = list(convs[-1])
            if r.below(4) == 0:
                out.append(last)
            else:
                out.append(list(convs[len(convs) - 1 - r.below(min(len(convs), 24))]))
        return out
    system = fresh(2) if kind == "chats" else []
    if kind not in ("chats", "solo-chats"):
        raise SystemExit(f"unknown synthetic trace {kind}")
    chats = []
    while len(out) < n:
        if not chats or r.below(3) != 0:
            c = system + fresh(1 + r.below(3))
            chats.append(list(c))
        else:
            n_ = len(chats)
            i = n_ - 1 - (r.below(n_) * r.below(n_)) // n_
            chats[i] += fresh(1)
            c = list(chats[i])
        out.append(c)
    return out


def load(path):
    with open(path) as f:
        return [json.loads(line)["hash_ids"] for line in f if line.strip()]


def simulate(reqs, cap, policy, marks=(0.95, 0.90), stats=None):
    """Prefix hit ratio (blocks) of `reqs` with `cap` blocks under `policy`. `stats` (a dict),
    when given, gets `copied`: blocks the segment-order policies wrote again (a window kept
    past its turn is copied forward, as compaction would), and `written`: blocks saved."""
    high, low = int(cap * marks[0]), int(cap * marks[1])
    windows = {}  # id -> {keys, last}
    refs = collections.Counter()
    holder = collections.defaultdict(list)
    seen_root = {}  # first block -> requests seen with it (saturating at 2): the history
    ghost = collections.OrderedDict()  # evicted block -> class (arc)
    target = [0.5 * cap]  # arc: the share of never-repeated roots
    hit_blocks = total = 0
    children = collections.defaultdict(set)  # block -> the next blocks seen after it (history)
    forks = set()  # blocks seen followed by two or more different blocks
    evict_age = [0.0]  # EWMA of evicted windows' time since last use (requests)
    copied = [0, 0]  # segment order: blocks copied forward, and the bump that orders them
    written = 0
    wpos = {}  # block -> where in the log its record is (the window that wrote it, or a copy)
    # LRU's copies (stats only): the log as segments of SEG blocks in write order; after each
    # eviction pass every sealed segment under COMPACT_LIVE live is compacted, its live blocks
    # copied to the head — what the daemon does after an eviction.
    slot, seg_blocks, head = {}, collections.defaultdict(set), [0]

    def place(k):
        slot[k] = head[0]
        seg_blocks[head[0] // SEG].add(k)
        head[0] += 1

    for t, ids in enumerate(reqs):
        for a, b in zip(ids, ids[1:]):
            ch = children[a]
            if b not in ch:
                ch.add(b)
                if len(ch) == 2:
                    forks.add(a)
        hit = 0
        for k in ids:
            if k not in refs:
                break
            hit += 1
        hit_blocks += hit
        total += len(ids)
        if policy == "arc" and hit < len(ids) and ids[hit] in ghost:
            g = 0
            for k in ids[hit:]:
                if k not in ghost:
                    break
                g += 1
            step = g if ghost[ids[hit]] == 1 else -g
            target[0] = min(cap, max(0, target[0] + step))
        seen_root[ids[0]] = min(seen_root.get(ids[0], 0) + 1, 2)
        if hit:
            for n in reversed(holder[ids[hit - 1]]):
                if n in windows:
                    windows[n]["last"] = t
                    windows[n]["ref"] = True
                    break
        for k in ids:
            if k not in refs:
                wpos[k] = (t, 0)
                written += 1
                if stats is not None and policy == "lru":
                    place(k)
            refs[k] += 1
            holder[k].append(t)
        windows[t] = {"keys": ids, "last": t, "pos": (t, 0), "ref": False}
        if len(refs) <= high:
            continue
        w = windows
        repeated = lambda n: seen_root.get(w[n]["keys"][0], 0) >= 2  # noqa: E731
        # A window holding a fork (a prefix seen with two different continuations: a document
        # asked different questions) before its last block; a conversation growing turn by
        # turn never forks.
        forked = lambda n: any(k in forks for k in w[n]["keys"][:-1])  # noqa: E731
        if policy == "fork":
            order = sorted(w, key=lambda n: (forked(n), w[n]["last"], n))
        elif policy == "fork-bonus":
            # Protection that ages: a forked window counts as used twice the mean age at
            # which windows are evicted later than it was.
            b = 2 * evict_age[0]
            order = sorted(w, key=lambda n: (w[n]["last"] + (b if forked(n) else 0), n))
        elif policy == "lru":
            order = sorted(w, key=lambda n: (w[n]["last"], n))
        elif policy in ("segment-fifo", "segment-clock"):
            # The log's own order: windows leave oldest-written first, so the log is reclaimed
            # from its tail (fifo); clock gives a window used since its last turn a second
            # chance by copying it to the log's head. Either way a record still referenced
            # when its stretch is reclaimed is copied (`stats["copied"]`).
            order = []
            while len(refs) > low and w:
                for n in sorted(w, key=lambda n: (w[n]["pos"], n)):
                    if len(refs) <= low:
                        break
                    pos, keys = w[n]["pos"], w[n]["keys"]
                    copied[1] += 1
                    head = (t, copied[1])
                    # Before this window's stretch of the log is reclaimed, the records there
                    # that stay referenced — by the window itself when clock keeps it, or by
                    # newer windows sharing its prefix — are copied to the head.
                    keep = policy == "segment-clock" and w[n]["ref"]
                    if keep:
                        w[n]["ref"], w[n]["pos"] = False, head
                    else:
                        del w[n]
                    for k in keys:
                        if not keep:
                            refs[k] -= 1
                            if refs[k] == 0:
                                del refs[k]
                                holder.pop(k, None)
                                wpos.pop(k, None)
                                continue
                        if wpos[k] <= pos:
                            wpos[k] = head
                            copied[0] += 1
        elif policy == "root-history":
            order = sorted(w, key=lambda n: (repeated(n), w[n]["last"], n))
        elif policy == "root-history-slru":
            prot, room = set(), 0.5 * cap
            for n in sorted((n for n in w if repeated(n)), key=lambda n: -w[n]["last"]):
                if len(w[n]["keys"]) > room:
                    break
                room -= len(w[n]["keys"])
                prot.add(n)
            order = sorted(w, key=lambda n: (n in prot, w[n]["last"], n))
        elif policy == "root-history-aged":
            residency = t - min(w[n]["last"] for n in w)
            order = sorted(w, key=lambda n: (w[n]["last"] + (residency // 2 if repeated(n) else 0), n))
        elif policy == "arc":
            c1 = sorted((n for n in w if not repeated(n)), key=lambda n: w[n]["last"])
            c2 = sorted((n for n in w if repeated(n)), key=lambda n: w[n]["last"])
            s1 = sum(len(w[n]["keys"]) for n in c1)
            order, i, j = [], 0, 0
            while i < len(c1) or j < len(c2):
                if i < len(c1) and (s1 > target[0] or j >= len(c2)):
                    order.append((c1[i], 1))
                    s1 -= len(w[c1[i]]["keys"])
                    i += 1
                else:
                    order.append((c2[j], 2))
                    j += 1
        else:
            raise SystemExit(f"unknown policy {policy}")
        for item in order:
            if len(refs) <= low:
                break
            n, cls = item if policy == "arc" else (item, 0)
            age = t - windows[n]["last"]
            evict_age[0] = age if evict_age[0] == 0 else 0.9 * evict_age[0] + 0.1 * age
            for k in windows.pop(n)["keys"]:
                refs[k] -= 1
                if refs[k] == 0:
                    del refs[k]
                    holder.pop(k, None)
                    if k in slot:
                        seg_blocks[slot.pop(k) // SEG].discard(k)
                    if policy == "arc":
                        ghost[k] = cls
                        ghost.move_to_end(k)
            while len(ghost) > cap:
                ghost.popitem(last=False)
        if stats is not None and policy == "lru":
            for sg in [sg for sg in seg_blocks if sg < head[0] // SEG]:
                live = seg_blocks[sg]
                if len(live) < COMPACT_LIVE * SEG:
                    del seg_blocks[sg]
                    for k in sorted(live):
                        copied[0] += 1
                        place(k)
    if stats is not None:
        stats["copied"], stats["written"] = copied[0], written
    return hit_blocks / max(total, 1)


POLICIES = ("lru", "root-history", "root-history-slru", "root-history-aged", "arc", "fork",
            "fork-bonus", "segment-fifo", "segment-clock")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", help="a Mooncake-format JSONL trace")
    ap.add_argument("--only", help="one of the synthetic traces (agents, chats, solo-chats)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--phases", action="store_true", help="add FILE-then-solo-chats traces")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    traces = []
    if a.trace:
        traces.append((a.trace, load(a.trace)))
    kinds = [a.only] if a.only else ([] if a.trace else ["agents", "chats", "solo-chats"])
    if a.trace and not a.only:
        kinds = ["agents", "chats", "solo-chats"]
    traces += [(k, synthetic(k)) for k in kinds]
    if a.phases and a.trace:
        first, solo = traces[0][1][:2000], synthetic("solo-chats", 2000, seed=11)
        traces += [("trace-then-solo", first + solo), ("solo-then-trace", solo + first)]
    out = []
    for name, reqs in traces:
        unique = len({k for r in reqs for k in r})
        for p in a.policies.split(","):
            ratios, copies = [], []
            for f in FRACTIONS:
                st = {}
                ratios.append(simulate(reqs, int(unique * f), p, stats=st))
                copies.append(st["copied"] / max(st["written"], 1))
            row = {"trace": name, "policy": p, "capacity_fractions": FRACTIONS,
                   "block_hit_ratio": ratios}
            if p.startswith("segment-") or p == "lru":
                row["copied_per_written"] = copies
            out.append(row)
    if a.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return
    lru = {r["trace"]: r["block_hit_ratio"] for r in out if r["policy"] == "lru"}
    print("trace / policy: block hit ratio (× LRU) at " + " / ".join(f"{f:g}" for f in FRACTIONS))
    for r in out:
        base = lru.get(r["trace"], r["block_hit_ratio"])
        cells = " ".join(f"{v:.3f} ({v / b if b else 1:.2f})" for v, b in zip(r["block_hit_ratio"], base))
        print(f"{r['trace'][-24:]:>24} {r['policy']:>18}: {cells}")
        if "copied_per_written" in r:
            print(f"{'':>24} {'copied / written':>18}: "
                  + " ".join(f"{c:.3f}" for c in r["copied_per_written"]))


if __name__ == "__main__":
    main()
