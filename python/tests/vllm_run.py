"""Runs prompts through a real vLLM engine (CPU) and writes token ids and logprobs as JSON.

    python vllm_run.py JOB.json OUT.json

JOB: {"model": dir, "socket": path or null (no connector), "prefix_caching": bool,
      "requests": [{"prompt": [ids] | {"from": i, "generated": k, "suffix": [ids]},
                    "max_tokens": n, "params": {...} or null,
                    "before": "shell command" or null, "after": "shell command" or null}]}
A prompt given as {"from": i, ...} is request i's prompt, its first k generated tokens, then the
suffix (a conversation going on). Requests run one at a time, in order.
"""

import json
import os
import sys


def main() -> None:
    job = json.load(open(sys.argv[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {}
    if job.get("socket"):
        kw["kv_transfer_config"] = {
            "kv_connector": "CwmConnector",
            "kv_connector_module_path": "cwm_vllm.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"socket": job["socket"], "timeout_s": 30},
        }
    llm = LLM(model=job["model"], tokenizer=job["model"], dtype="bfloat16", max_model_len=512,
              enforce_eager=True, block_size=32, max_num_seqs=4, seed=0,
              enable_prefix_caching=job.get("prefix_caching", True), **kw)
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
    json.dump({"results": results}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
