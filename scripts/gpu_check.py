#!/usr/bin/env python3
"""The Python half of scripts/gpu-check.sh.

A separate process from cwm, as a real engine is: allocates KV caches with torch in every
supported layout (random bits), exports CUDA IPC handles (and an interprocess event recorded
after the "forward pass"), and runs `cwm gpu-check run` to freeze scattered blocks and thaw
them into different, poisoned blocks; then compares bit for bit in torch and checks that no
other block changed. Then measures: `cwm gpu-check bench` (copy ceilings, gather/scatter alone,
grid sweep, freeze/thaw end to end vs the raw disk, RAM tier) and a torch baseline
(index_select per layer into a GPU buffer + one D2H copy; index_copy_ back).

Usage: gpu_check.py OUT_DIR CWM_BINARY
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

OUT = CWM = None  # set by main(): importing this file touches no GPU (the table is tested on CPUs)
DEV = torch.device("cuda")
DT = torch.bfloat16
results = {"checks": [], "device": None, "torch": torch.__version__}
failures = 0


def say(msg):
    print(msg, flush=True)


def check(name, ok, detail=""):
    global failures
    results["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    if not ok:
        failures += 1
    say(f"{'PASS' if ok else 'FAIL'} {name} {detail}")


def make(kind, L, NB, BS, H, D, order=None):
    shapes = {
        "flash_2nbhd": [(2, NB, BS, H, D)] * L,
        "flash_n2bhd": [(NB, 2, BS, H, D)] * L,
        "packed_kv": [(NB, BS, H, 2 * D)] * L,
        "mla": [(NB, BS, D)] * L,
    }
    cross = {
        "LBHNC": (L, NB, H, BS, 2 * D),
        "LBNHC": (L, NB, BS, H, 2 * D),
        "BLHNC": (NB, L, H, BS, 2 * D),
        "BLNHC": (NB, L, BS, H, 2 * D),
    }
    shp = [cross[order]] if kind == "cross_layer" else shapes[kind]
    ts = [torch.empty(s, dtype=DT, device=DEV) for s in shp]
    for t in ts:
        t.view(torch.int16).random_(-32768, 32767)
    return ts


def block(kind, ts, b, order=None):
    if kind == "flash_2nbhd":
        parts = [t[:, b] for t in ts]
    elif kind == "cross_layer" and order.startswith("L"):
        parts = [ts[0][:, b]]
    else:
        parts = [t[b] for t in ts]
    return torch.cat([p.reshape(-1) for p in parts]).view(torch.int16)


def export(ts):
    out = []
    for t in ts:
        info = t.untyped_storage()._share_cuda_()
        handle, offset = bytes(info[1]), info[3]
        # torch >= 2.5 prefixes the cudaIpcMemHandle_t with a format version byte and a type
        # byte ('c': cudaMalloc segment; 'e': expandable segment, not importable this way).
        if len(handle) == 66:
            if handle[1:2] != b"c":
                raise RuntimeError("expandable-segment allocations cannot be imported with cuIpcOpenMemHandle")
            handle = handle[2:]
        elif len(handle) == 65:
            handle = handle[1:]
        out.append({
            "handle": handle.hex(),
            "offset": int(offset) + t.storage_offset() * t.element_size(),
            "size": t.numel() * t.element_size(),
        })
    return out


def cwm(mode, spec, workdir, env=None):
    path = os.path.join(workdir, f"spec-{mode}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    p = subprocess.run([CWM, "gpu-check", mode, "--spec", path, "--dir", workdir],
                       capture_output=True, text=True, timeout=150 if mode == "bench" else 60,
                       env=dict(os.environ, **(env or {})))
    if p.stderr.strip():
        say(p.stderr.strip()[-2000:])
    if p.returncode != 0:
        raise RuntimeError(f"cwm gpu-check {mode} exited {p.returncode}: {p.stderr[-1500:]}")
    return json.loads(p.stdout)


def case(name, kind, L, NB, BS, H, D, nsel, workdir, order=None, bench=False, env=None):
    torch.manual_seed(hash(name) % 1000)
    ts = make(kind, L, NB, BS, H, D, order)
    perm = torch.randperm(NB).tolist()
    src, dst, others = perm[:nsel], perm[nsel:2 * nsel], perm[2 * nsel:2 * nsel + 8]
    ev = torch.cuda.Event(interprocess=True)
    ev.record()
    torch.cuda.synchronize()
    want = [block(kind, ts, b, order).clone() for b in src]
    keep = [block(kind, ts, b, order).clone() for b in others]
    layout = {"kind": kind, "layers": L, "blocks": NB, "block_size": BS, "heads": H,
              "head": D, "dtype": "bf16", "order": order}
    spec = {"layout": layout, "tensors": export(ts), "src": src, "dst": dst,
            "tokens": nsel * BS - 3, "event": bytes(ev.ipc_handle()).hex()}
    try:
        r = cwm("run", spec, workdir, env)
    except Exception as e:  # noqa: BLE001
        check(f"{name}: freeze+thaw", False, str(e)[:500])
        return None
    torch.cuda.synchronize()
    same = all(torch.equal(block(kind, ts, d, order), w) for d, w in zip(dst, want))
    untouched = all(torch.equal(block(kind, ts, b, order), k) for b, k in zip(others, keep))
    check(f"{name}: {nsel} scattered blocks thawed bit-exactly into other blocks", same,
          f"kernel={r.get('kernel')} restored={r['thaw']['blocks_restored']}")
    check(f"{name}: no other block written", untouched)
    check(f"{name}: out-of-range block id refused", r.get("out_of_range_refused"))
    took = True
    if env and env.get("CWM_SCATTER"):
        took = r.get("scatter_path_taken") == env["CWM_SCATTER"]
        check(f"{name}: the scatter took the {env['CWM_SCATTER']} path", took,
              f"asked {r.get('scatter_path')}, took {r.get('scatter_path_taken')}")
    if name.startswith("llama"):
        check("copy kernel compiled with NVRTC and used", r.get("kernel"), str(r.get("kernel_error")))
    if not bench:
        del ts
        torch.cuda.empty_cache()
        return same and untouched and took
    # Torch baseline on the same cache and blocks: index_select per layer into a GPU buffer
    # (as large as the capture) + one D2H copy into pinned memory; and back.
    idx_s = torch.tensor(src, device=DEV)
    idx_d = torch.tensor(dst, device=DEV)
    buf = torch.empty((L, 2, nsel, BS, H, D), dtype=DT, device=DEV)
    pinned = torch.empty(buf.shape, dtype=DT, pin_memory=True)
    nbytes = buf.numel() * buf.element_size()
    best_g, best_s = 1e9, 1e9
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for l, t in enumerate(ts):
            torch.index_select(t, 1, idx_s, out=buf[l])
        pinned.copy_(buf, non_blocking=True)
        torch.cuda.synchronize()
        best_g = min(best_g, time.perf_counter() - t0)
        t0 = time.perf_counter()
        buf.copy_(pinned, non_blocking=True)
        for l, t in enumerate(ts):
            t.index_copy_(1, idx_d, buf[l])
        torch.cuda.synchronize()
        best_s = min(best_s, time.perf_counter() - t0)
    del buf, pinned
    torch.cuda.empty_cache()
    try:
        b = cwm("bench", spec, workdir, env)
    except Exception as e:  # noqa: BLE001
        check("bench", False, str(e)[:500])
        return None
    b["torch_gather_gbps"] = nbytes / best_g / 1e9
    b["torch_scatter_gbps"] = nbytes / best_s / 1e9
    b["torch_staging_bytes"] = nbytes
    return b


def main():
    global OUT, CWM
    OUT, CWM = sys.argv[1], sys.argv[2]
    results["device"] = torch.cuda.get_device_name(0)
    os.makedirs(OUT, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="cwm-gpu-", dir=os.environ.get("CWM_GPU_DIR", "/tmp"))
    cases = [
        ("n2bhd", "flash_n2bhd", 4, 512, 16, 8, 128, 64, None),
        ("packed", "packed_kv", 4, 512, 16, 8, 128, 64, None),
        ("LBHNC", "cross_layer", 4, 512, 16, 8, 64, 64, "LBHNC"),
        ("LBNHC", "cross_layer", 4, 512, 16, 8, 64, 64, "LBNHC"),
        ("BLHNC", "cross_layer", 4, 512, 16, 8, 64, 64, "BLHNC"),
        ("BLNHC", "cross_layer", 4, 512, 16, 8, 64, 64, "BLNHC"),
        ("mla", "mla", 4, 512, 16, 1, 576, 64, None),
    ]
    for name, kind, L, NB, BS, H, D, n, order in cases:
        case(name, kind, L, NB, BS, H, D, n, workdir, order)
    # The other scatter paths, bit-exact like the kernel's: the copy engines
    # (cuMemcpyBatchAsync), the L2-hinted kernel, bulk-async copies through shared memory (sm_90).
    # Only paths that pass here are measured below (a broken one must not hang the bench).
    good = []
    for path in ("copy-engine", "l2", "bulk"):
        ok = case(f"n2bhd, {path} scatter", "flash_n2bhd", 4, 512, 16, 8, 128, 64, workdir,
                  env={"CWM_SCATTER": path})
        if path == "bulk":
            ok = ok and case("llama-shaped (2,B,N,H,D), bulk scatter", "flash_2nbhd", 8, 256,
                             16, 8, 128, 64, workdir, env={"CWM_SCATTER": "bulk"})
        if ok:
            good.append(path)
    # Llama-3.1-8B shape, 1,024 scattered blocks of 2 MiB (2 GiB), then measurements.
    b = case("llama8b (2,B,N,H,D)", "flash_2nbhd", 32, 4096, 16, 8, 128, 1024, workdir, bench=True,
             env={"CWM_BENCH_PATHS": ",".join(good)})
    if b:
        results["bench"] = b
        check("gather >= 0.93 x pinned D2H", b["gather_ratio"] >= 0.93, f"{b['gather_ratio']:.3f}")
        check("scatter >= 0.93 x pinned H2D", b["scatter_ratio"] >= 0.93, f"{b['scatter_ratio']:.3f}")
        check("gather faster than torch baseline", b["gather_gbps"] > b["torch_gather_gbps"])
        check("scatter faster than torch baseline", b["scatter_gbps"] > b["torch_scatter_gbps"])
        check("freeze >= 0.90 x min(PCIe, disk)", b["freeze_ratio"] >= 0.90, f"{b['freeze_ratio']:.3f}")
        check("thaw >= 0.90 x min(PCIe, disk)", b["thaw_ratio"] >= 0.90, f"{b['thaw_ratio']:.3f}")
        check("RAM-tier thaw >= 0.85 x H2D", b["tier_ratio"] >= 0.85, f"{b['tier_ratio']:.3f}")
        best = max((p for p in b.get("scatter_paths", [])
                    if p.get("scatter_ratio") and p["took"] == p["path"]),
                   key=lambda p: p["scatter_ratio"], default=None)
        if best:
            say(f"fastest other scatter path: {best['path']} at grid {best['grid']}: "
                f"{best['scatter_ratio']:.3f} of H2D (kernel: {b['scatter_ratio']:.3f})")
    with open(os.path.join(OUT, "gpu-check.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = render(results, b, failures)
    with open(os.path.join(OUT, "gpu-check.txt"), "w") as f:
        f.write(table + "\n")
    say(table)
    sys.exit(1 if failures else 0)


def stream_row(b):
    """The thaw as it arrives from the shared tier (fed from memory here: no Redis)."""
    st = b.get("stream") or {"error": "not measured"}
    if st.get("gbps") is None:
        return f"thaw as it arrives: {st.get('error')}"
    how = "via staging" if st.get("staged") else "direct"
    return (f"{'thaw as it arrives (%s)' % how:34} {st['gbps']:8.2f} "
            f"{b['h2d_pinned_gbps']:8.2f} {st['ratio']:6.3f}")


def render(results, b, failures):
    """The table printed last: every figure of `cwm gpu-check bench` (`b`) beside its ceiling."""
    lines = [f"cwm gpu-check on {results['device']} (torch {results['torch']})"]
    if b:
        lines += [
            f"{'path':34} {'GB/s':>8} {'ceiling':>8} {'ratio':>6}",
            f"{'pinned D2H cudaMemcpy':34} {b['d2h_pinned_gbps']:8.2f}",
            f"{'pinned H2D cudaMemcpy':34} {b['h2d_pinned_gbps']:8.2f}",
            f"{'cwm gather -> pinned (grid %d)' % b['grid']:34} {b['gather_gbps']:8.2f} {b['d2h_pinned_gbps']:8.2f} {b['gather_ratio']:6.3f}",
            f"{'cwm scatter <- pinned':34} {b['scatter_gbps']:8.2f} {b['h2d_pinned_gbps']:8.2f} {b['scatter_ratio']:6.3f}",
            f"{'torch index_select + D2H':34} {b['torch_gather_gbps']:8.2f}",
            f"{'torch H2D + index_copy_':34} {b['torch_scatter_gbps']:8.2f}",
            f"{'raw O_DIRECT write / read':34} {b['raw_write_gbps']:8.2f} {b['raw_read_gbps']:8.2f}",
            f"{'cwm freeze end to end':34} {b['freeze_gbps']:8.2f} {min(b['raw_write_gbps'], b['d2h_pinned_gbps']):8.2f} {b['freeze_ratio']:6.3f}",
            f"{'cwm thaw end to end':34} {b['thaw_gbps']:8.2f} {min(b['raw_read_gbps'], b['h2d_pinned_gbps']):8.2f} {b['thaw_ratio']:6.3f}",
            f"{'cwm thaw from RAM tier':34} {b['tier_thaw_gbps']:8.2f} {b['h2d_pinned_gbps']:8.2f} {b['tier_ratio']:6.3f}",
            stream_row(b),
        ] + [
            (f"{'scatter path %s (grid %d)' % (p['path'], p['grid']):34} {p['scatter_gbps']:8.2f} {b['h2d_pinned_gbps']:8.2f} {p['scatter_ratio']:6.3f}"
             + ("" if p["took"] == p["path"] else f"  (took {p['took']})")
             if p.get("scatter_gbps") else f"scatter path {p['path']}: {p.get('error')}")
            for p in b.get("scatter_paths", [])
        ] + [
            (f"{'RAM tier thaw, %s scatter' % p['path']:34} {p['tier_gbps']:8.2f} {b['h2d_pinned_gbps']:8.2f} {p['tier_ratio']:6.3f}"
             + ("" if p["took"] == p["path"] else f"  (took {p['took']})")
             if p.get("tier_gbps") else f"RAM tier thaw, {p['path']} scatter: {p.get('error')}")
            for p in b.get("tier_paths", [])
        ] + [
            "launch sweep (CTAs x threads: gather / scatter GB/s): " + ", ".join(
                f"{g['grid']}x{g['threads']}: {g['gather_gbps']:.1f}/{g['scatter_gbps']:.1f}" for g in b["grid_sweep"]),
        ]
    lines.append(f"{sum(c['ok'] for c in results['checks'])} passed, {failures} failed")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
