"""Runs prompts through a real vLLM engine (CPU) and writes token ids and logprobs as JSON.

    python vllm_run.py JOB.json OUT.json

JOB: {"model": dir, "socket": path or null (no connector), "prefix_caching": bool,
      "tensor_parallel_size": n (default 1), "extra_config": {...} (more connector settings),
      "requests": [{"prompt": [ids] | {"from": i, "generated": k, "suffix": [ids]},
                    "max_tokens": n, "params": {...} or null,
                    "before": "shell command" or null, "after": "shell command" or null,
                    "during": "shell command" or null}]}
A prompt given as {"from": i, ...} is request i's prompt, its first k generated tokens, then the
suffix (a conversation going on). Requests run one at a time, in order; "during" runs once the
request's first token is out (the scheduler has seen it), while it is still generating.
OUT: {"results": [...], "workers": [{"threads", "cpus", "omp"} of each engine worker]}: the
threads and CPUs the forward passes ran on, which must be the same for runs whose logprobs are
compared (vLLM's CPU backend picks them itself, differently with a KV connector).
"""

import json
import os
import sys


def _cpu_binding(worker) -> dict:
    """Runs in an engine worker (collective_rpc): the threads its forward passes run on and its
    main thread's CPUs."""
    import os

    import torch

    return {"threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0)),
            "omp": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_PLACES",
                                                   "OMP_PROC_BIND")}}


def _run_with(llm, prompt, sp, during: str) -> list:
    """One request stepped through the engine: `during` runs when its first token is out."""
    import subprocess

    from vllm.sampling_params import RequestOutputKind

    sp.output_kind = RequestOutputKind.CUMULATIVE
    llm.llm_engine.add_request(f"during-{id(sp)}", prompt, sp)
    done, fired = [], False
    while llm.llm_engine.has_unfinished_requests():
        for o in llm.llm_engine.step():
            if not fired and o.outputs and o.outputs[0].token_ids:
                fired = True
                assert not o.finished, "the request finished before its 'during' hook ran"
                subprocess.run(during, shell=True, check=True)
            if o.finished:
                done.append(o)
    return done


def main() -> None:
    job = json.load(open(sys.argv[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # collective_rpc with a function (the workers' CPU binding) is pickled.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {}
    if job.get("socket"):
        kw["kv_transfer_config"] = {
            "kv_connector": "CwmConnector",
            "kv_connector_module_path": "cwm_vllm.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"socket": job["socket"], "timeout_s": 30,
                                          **job.get("extra_config", {})},
        }
    tp = job.get("tensor_parallel_size", 1)
    if tp > 1:
        # One process per rank (the CPU build's TP); each rank's threads bound by
        # VLLM_CPU_OMP_THREADS_BIND ("0|1"), since this machine has a single NUMA node.
        kw["tensor_parallel_size"] = tp
        kw["distributed_executor_backend"] = "mp"
    llm = LLM(model=job["model"], tokenizer=job["model"], dtype="bfloat16", max_model_len=512,
              enforce_eager=True, block_size=32, max_num_seqs=4, seed=0,
              enable_prefix_caching=job.get("prefix_caching", True), **kw)
    workers = llm.collective_rpc(_cpu_binding)
    import subprocess
    import time

    results = []
    for r in job["requests"]:
        if isinstance(r["prompt"], dict):
            f = r["prompt"]
            base = results[f["from"]]
            r["prompt"] = base["prompt"] + base["token_ids"][: f["generated"]] + f["suffix"]
        if r.get("before"):
            subprocess.run(r["before"], shell=True, check=True)
        batch = [r]
        prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in batch]
        sps = []
        for r in batch:
            extra = {"kv_transfer_params": r["params"]} if r.get("params") else None
            sps.append(SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], logprobs=3,
                                      ignore_eos=True, extra_args=extra))
        t0 = time.monotonic()
        if r.get("during"):
            outs = _run_with(llm, prompts[0], sps[0], r["during"])
        else:
            outs = llm.generate(prompts, sps, use_tqdm=False)
        secs = time.monotonic() - t0
        for o in outs:
            c = o.outputs[0]
            results.append({
                "prompt": r["prompt"],
                "secs": secs,
                "token_ids": list(c.token_ids),
                "logprobs": [[[int(k), float(v.logprob)] for k, v in sorted(lp.items())] for lp in (c.logprobs or [])],
                "num_cached_tokens": o.num_cached_tokens,
                "kv_transfer_params": o.kv_transfer_params,
            })
        if r.get("after"):
            subprocess.run(r["after"], shell=True, check=True)
    json.dump({"results": results, "workers": workers}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
