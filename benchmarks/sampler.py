"""Sampler throughput with a rank-1 adapter vs the base model, and adapter push latency vs a step's sampling.

One invocation, side by side: in one LoRA-enabled engine the same prompts are generated with no adapter,
with one rank-1 adapter, and split across two adapters; then (in a subprocess) by an engine built without
LoRA support at all, i.e. plain base-model serving. ignore_eos, so every run emits the same token count.

    python benchmarks/sampler.py [--model smollm2-135m-gguf] [--prompts 64] [--tokens 128]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-gguf")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pushes", type=int, default=10)
    ap.add_argument("--plain-engine", action="store_true", help=argparse.SUPPRESS)  # subprocess mode
    args = ap.parse_args()
    if args.plain_engine:
        return plain_engine(args)

    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rl_lora.config import ALL_LINEAR
    from rl_lora.data import DataConfig, arithmetic_problems, prompt_token_ids
    from rl_lora.learner import Learner
    from rl_lora.models import resolve_model_path
    from rl_lora.sampler import Sampler

    path = resolve_model_path(args.model)
    sampler = Sampler(path, max_model_len=1024, max_loras=2)
    learner = Learner(path, rank=1, target_modules=ALL_LINEAR)
    with torch.no_grad():  # a non-trivial adapter, so the LoRA kernels do real work
        for m in learner.adapters.values():
            m.lora_B.normal_(0, 1e-3)
    problems = arithmetic_problems(args.prompts, 0, 99)
    prompts = [TokensPrompt(prompt_token_ids=prompt_token_ids(sampler.tokenizer, p, DataConfig())) for p in problems]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=1.0, logprobs=0, seed=0)

    push_s = []
    for v in range(1, args.pushes + 1):
        sampler.push(v, learner.write_adapter)
        push_s.append(sampler.last_push_s)
    ref = sampler.live[args.pushes]
    ref2 = sampler.push(args.pushes + 1, learner.write_adapter, evict_older=False)

    def run(loras):
        t0 = time.perf_counter()
        outs = sampler.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        dt = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt, dt

    run(None)  # warm-up
    rows = {}
    for name, loras in [("base", None), ("rank-1 LoRA", [sampler.request_for(ref)] * len(prompts)),
                        ("two LoRAs mixed", [sampler.request_for(ref if i % 2 else ref2) for i in range(len(prompts))]),
                        ("base (again)", None)]:
        rows[name] = run(loras)
    base = (rows["base"][0] + rows["base (again)"][0]) / 2
    print(f"\nsampling {args.prompts} prompts x {args.tokens} tokens, model {args.model}")
    print(f"{'':18s}{'tok/s':>8s}{'vs base':>9s}{'seconds':>9s}")
    for name, (tps, dt) in rows.items():
        print(f"{name:18s}{tps:8.1f}{tps / base:8.2f}x{dt:9.1f}")
    sampler.close()
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--plain-engine", "--model", args.model, "--prompts",
                          str(args.prompts), "--tokens", str(args.tokens)], capture_output=True, text=True)
    try:
        plain = json.loads(out.stdout.strip().splitlines()[-1])
        tps = plain["tok_s"]
        print(f"{'base, no-LoRA engine':18s}{tps:8.1f}{tps / base:8.2f}x{plain['seconds']:9.1f}")
        print(f"rank-1 LoRA vs plain base engine: {rows['rank-1 LoRA'][0] / tps:.2f}x")
    except (IndexError, ValueError, KeyError):
        print("plain engine run failed:", out.stderr[-2000:])
    push_s.sort()
    step_s = rows["rank-1 LoRA"][1]
    print(f"\nadapter push (write PEFT files to RAM + load into the running engine), {args.pushes} pushes:")
    print(f"  median {1000 * push_s[len(push_s) // 2]:.1f} ms, max {1000 * push_s[-1]:.1f} ms")
    print(f"  = {100 * push_s[len(push_s) // 2] / step_s:.2f}% of this step's sampling time ({step_s:.1f} s)")


def plain_engine(args):
    """Base-model serving without LoRA support (the engine a user would run without adapters)."""
    import json

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from rl_lora.data import DataConfig, arithmetic_problems, prompt_token_ids
    from rl_lora.models import resolve_model_path
    from rl_lora.sampler import _configure_cpu_env

    import torch

    if not torch.cuda.is_available():
        _configure_cpu_env(1)
    llm = LLM(model=resolve_model_path(args.model), dtype="float32", max_model_len=1024, seed=0,
              enable_chunked_prefill=False)
    tok = llm.get_tokenizer()
    problems = arithmetic_problems(args.prompts, 0, 99)
    prompts = [TokensPrompt(prompt_token_ids=prompt_token_ids(tok, p, DataConfig())) for p in problems]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=1.0, logprobs=0, seed=0)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    print(json.dumps({"tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / dt, "seconds": dt}))


if __name__ == "__main__":
    main()
