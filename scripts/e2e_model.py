#!/usr/bin/env python3
"""A real model on the GPU through cwm (part of scripts/gpu-check.sh; vLLM is not installed
there, so the paged cache is built in torch in vLLM's CUDA layout).

A Llama-3.1-8B-shaped model from transformers (random weights, fixed seed, bf16) prefills a
prompt; its KV goes into a paged cache `(2, num_blocks, block_size, H, D)` per layer
(FlashAttention layout) at scattered block ids; the connector's worker code
(cwm_vllm.worker.CwmWorker: the piece table read from the tensors, CUDA IPC registration, the
interprocess event) registers it with `cwm serve` and freezes; the paged cache is wiped and
other block ids chosen; thaw; decoding continues from the thawed cache. The next-token logits
after the thaw must equal those of a run that never froze, bit for bit (same KV bytes, same
kernels). Then, per context length, TTFT with thaw from the RAM tier and from disk against
recomputing the prefill.

    python3 scripts/e2e_model.py OUT_DIR CWM_BINARY [--lengths 2048,8192,32768] [--layers N]
"""

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Deterministic cuBLAS (read when CUDA initialises): see torch.use_deterministic_algorithms.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from cwm_vllm.worker import CwmWorker, LoadSpec, SaveSpec  # noqa: E402

BS = 16


SEGMENT = "4GiB"  # main() sizes it to the largest window (segments are preallocated)


def start_cwm(cwm: str, work: Path, tier: str) -> subprocess.Popen:
    sock = work / "cwm.sock"
    if sock.exists():
        sock.unlink()
    p = subprocess.Popen([cwm, "serve", "--data-dir", str(work / "data"), "--socket", str(sock),
                          "--capacity", "64GiB", "--segment-size", SEGMENT, "--tier", tier,
                          "--staging", "1GiB"],
                         stdout=open(work / "cwm.log", "ab"), stderr=subprocess.STDOUT)
    PROCS.append(p)
    for _ in range(300):
        if sock.exists():
            return p
        time.sleep(0.05)
    raise RuntimeError("cwm serve did not start")


PROCS: list[subprocess.Popen] = []


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)


def cleanup(work: Path) -> None:
    """Stops any cwm still running and removes the data directory (GiBs of preallocated
    segments: left behind, every run would eat the disk)."""
    for p in PROCS:
        try:
            stop(p)
        except Exception:  # noqa: BLE001 - best effort at exit
            p.kill()
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("cwm")
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check this script itself "
                    "on a machine without a GPU (KV registered as process memory)")
    ap.add_argument("--tiny", action="store_true", help="a small model of the same structure")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    if a.tiny:
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=a.layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          vocab_size=1024, max_position_embeddings=8192,
                          torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          vocab_size=128256, max_position_embeddings=131072,
                          rope_theta=500000.0, torch_dtype=torch.bfloat16,
                          attn_implementation="sdpa")
    dev = torch.device(a.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    # Logits are compared bit for bit: the GPU must compute the same inputs the same way every
    # time. On an H200 two decodes of identical KV at 8K tokens differed by one bf16 ulp with
    # the default SDPA kernels, deterministic mode or not; the one-token decodes compared
    # therefore run on SDPA's math backend (plain matmuls; the prefill keeps the fast one).
    # CUBLAS_WORKSPACE_CONFIG is set before torch initialises CUDA (see the top of the file).
    torch.use_deterministic_algorithms(True, warn_only=True)
    with dev:
        model = LlamaForCausalLM(cfg).eval()
    print(f"model: {a.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"params, built in {time.time() - t0:.1f} s", flush=True)
    L, H, D = a.layers, cfg.num_key_value_heads, cfg.head_dim
    lengths = [int(x) for x in a.lengths.split(",")]
    max_blocks = max(lengths) // BS + 8
    num_blocks = 2 * max_blocks + 64
    paged = [torch.zeros(2, num_blocks, BS, H, D, device=dev) for _ in range(L)]
    work = Path(tempfile.mkdtemp(prefix="cwm-e2e-model-"))
    atexit.register(cleanup, work)
    # `timeout` (gpu-check.sh) ends this script with SIGTERM: exit through atexit then too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    global SEGMENT
    window = max(lengths) * L * 2 * H * D * 2
    SEGMENT = str(min(4 << 30, max(64 << 20, (2 * window + 4095) // 4096 * 4096)))
    # Room for the largest window twice over (the tier is pinned host memory).
    tier = f"{((max(lengths) * L * 2 * H * D * 2 * 2) >> 30) + 1}GiB"
    proc = start_cwm(a.cwm, work, tier)
    w = CwmWorker(str(work / "cwm.sock"), "e2e-model", "llama-3.1-8b-random:bf16")
    w.register(paged, num_blocks, BS, H, D, name="flash(2,B,N,H,D)")
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    results = {"card": card, "layers": L, "lengths": {}}
    checks = []
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # warm-up: kernels chosen and loaded before anything is timed
        model.model(torch.randint(0, cfg.vocab_size, (1, 512), generator=g).to(dev), use_cache=True)
    sync()
    for n in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, n + 1), generator=g).to(dev)
        prompt, nxt = ids[:, :n], ids[:, n:]
        nb = n // BS
        def decode_from(blocks: list[int]) -> torch.Tensor:
            """Logits of the next token from a cache rebuilt from paged `blocks`."""
            dc = DynamicCache()
            for layer in range(L):
                k = paged[layer][0, blocks].reshape(n, H, D).transpose(0, 1).unsqueeze(0)
                v = paged[layer][1, blocks].reshape(n, H, D).transpose(0, 1).unsqueeze(0)
                dc.update(k.contiguous(), v.contiguous(), layer)
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                return model(nxt, past_key_values=dc, use_cache=True).logits[0, -1].float()

        # Recompute: the prefill (TTFT without cwm).
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            # The decoder alone: no logits for the whole prompt (32K × vocab would be 8 GiB).
            o = model.model(prompt, use_cache=True)
        sync()
        prefill_s = time.perf_counter() - t
        cache = o.past_key_values
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            ref_logits = model(nxt, past_key_values=cache, use_cache=True).logits[0, -1].float()
        # KV into the paged cache at scattered ids.
        perm = torch.randperm(num_blocks, generator=g).tolist()
        src, dst = perm[:nb], perm[nb:2 * nb]
        for layer in range(L):
            k = cache.layers[layer].keys[0, :, :n] if hasattr(cache, "layers") else cache.key_cache[layer][0, :, :n]
            v = cache.layers[layer].values[0, :, :n] if hasattr(cache, "layers") else cache.value_cache[layer][0, :, :n]
            kb = k.transpose(0, 1).reshape(nb, BS, H, D)
            vb = v.transpose(0, 1).reshape(nb, BS, H, D)
            paged[layer][0, src] = kb
            paged[layer][1, src] = vb
        del cache, o
        # What the freeze must give back, byte for byte, and the logits of a cache rebuilt
        # from those blocks the way the thawed one is (never frozen): the thaw's logits must
        # equal these exactly. The native cache's logits (ref_logits) are reported beside
        # them: a rebuilt cache may take other kernels than the one the prefill built.
        kv_src = [p[:, src].clone() for p in paged]
        ctl_logits = decode_from(src)
        native_diff = float((ctl_logits - ref_logits).abs().max())
        # The same decode again: how reproducible the GPU's arithmetic is here (0 expected).
        repeat_diff = float((decode_from(src) - ctl_logits).abs().max())
        w.record_event()
        sync()
        toks = prompt[0].tolist()
        r = w.save(SaveSpec(req_id=f"n{n}", window=f"ctx-{n}", tokens=toks, block_ids=src))
        ok = r is not None and r.get("status") == "durable"
        checks.append((f"freeze {n} tokens", ok))

        def kv_equal(blocks: list[int]) -> bool:
            return all(torch.equal(paged[layer][:, blocks], kv_src[layer]) for layer in range(L))

        def wiped_load(req_id: str) -> tuple[list[int], dict, float]:
            """Poisons the cache, thaws the window into `dst`; (failed ids, report, seconds)."""
            for p in paged:
                p.fill_(float("nan"))
            sync()
            t = time.perf_counter()
            failed, rep = w.load(LoadSpec(req_id=req_id, window=f"ctx-{n}", tokens=toks,
                                          first_block=0, block_ids=dst))
            sync()
            return failed, rep, time.perf_counter() - t

        # Thaw into other blocks (from the RAM tier: the freeze filled it).
        failed, rep, tier_s = wiped_load(f"n{n}")
        checks.append((f"thaw {n} tokens (tier: {rep.get('blocks_from_tier')} blocks)", not failed))
        checks.append((f"KV after thaw bit-exact ({n} tokens, tier)", kv_equal(dst)))
        # Continue decoding from the thawed cache.
        logits = decode_from(dst)
        exact = torch.equal(logits, ctl_logits)
        maxdiff = float((logits - ctl_logits).abs().max())
        checks.append((f"logits after thaw == never frozen ({n} tokens; max |diff| {maxdiff:g})", exact))
        # From disk: restart cwm (empty tier, O_DIRECT: no page cache), the worker re-registers.
        stop(proc)
        proc = start_cwm(a.cwm, work, "0")
        w.ensure_registered()
        failed, rep2, disk_s = wiped_load(f"d{n}")
        checks.append((f"thaw {n} tokens from disk", not failed))
        checks.append((f"KV after thaw bit-exact ({n} tokens, disk)", kv_equal(dst)))
        del kv_src
        stop(proc)
        proc = start_cwm(a.cwm, work, tier)
        w.ensure_registered()
        kv_bytes = nb * L * 2 * BS * H * D * 2
        results["lengths"][n] = {
            "kv_bytes": kv_bytes, "prefill_s": prefill_s, "thaw_tier_s": tier_s,
            "thaw_disk_s": disk_s, "tier_report": rep, "disk_report": rep2,
            "speedup_tier": prefill_s / tier_s, "speedup_disk": prefill_s / disk_s,
            "logits_exact": exact, "logits_max_abs_diff": maxdiff,
            "native_cache_vs_rebuilt_max_abs_diff": native_diff,
            "repeat_decode_max_abs_diff": repeat_diff,
        }
        print(f"{n:>6} tokens  KV {kv_bytes / 2**30:6.2f} GiB  prefill {prefill_s * 1e3:8.1f} ms  "
              f"thaw tier {tier_s * 1e3:8.1f} ms ({prefill_s / tier_s:5.1f}x)  "
              f"disk {disk_s * 1e3:8.1f} ms ({prefill_s / disk_s:5.1f}x)  logits exact {exact} "
              f"(native cache vs rebuilt: max |diff| {native_diff:g}; decode repeated: {repeat_diff:g})",
              flush=True)
    stop(proc)
    results["checks"] = [{"check": c, "pass": ok} for c, ok in checks]
    (out / "e2e-model.json").write_text(json.dumps(results, indent=1))
    for c, ok in checks:
        print(("PASS " if ok else "FAIL ") + c)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
