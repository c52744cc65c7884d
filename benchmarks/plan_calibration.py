"""Calibrate `rl-lora plan`'s learner activation model: measure our Learner on reduced-depth models of a recipe's
real widths, fit a per-layer slope, and check the prediction at a third depth.

Each measurement runs in its own process: a Qwen3-8B-shaped model (hidden 4096, d_ff 12288, 32 heads, 8 KV heads,
head_dim 128) with 1, 2 or 3 decoder layers and random weights, rank-1 LoRA on every linear layer, one
`Learner.train_step` on a GRPO group (one prompt, G completions; prompt sharing on), activation checkpointing off
and on. The vocabulary is cut to 4096: the logits chunk does not grow with depth and is counted apart in
rl_lora/plan.py. Peak memory is the process's peak RSS during the step (VmHWM reset via /proc/self/clear_refs after
the model is built) minus its RSS before the step, with MALLOC_MMAP_THRESHOLD_ fixed (glibc's dynamic threshold
keeps freed blocks of up to 32 MiB in the heap: the same runs then read 27-37% higher, and checkpointing seemed to
keep 264 KiB per token per layer instead of 17). fp32 on this AVX2 CPU (bf16 matmuls are several times slower
here); rl_lora.plan counts the same elements at 2 bytes in bf16, plus the norms' fp32 copies.

    PYTHONPATH=. python benchmarks/plan_calibration.py [--prompt 128] [--completion 448] [--group 2] [--results F]

Measured once on this 2-core AVX2 machine (shared with 5 other jobs), 2026-12-01, fp32, 1 prompt of 128 + 2
completions of 448 (1024 tokens); activations = peak RSS of the step above the RSS before it:

    depth  checkpointing  MiB    per token
    1      off            597    583 KiB
    2      off            849    +251 KiB per layer (plan: ACT_H fitted to this slope)
    3      off            1100   predicted from 1, 2: 1100 MiB, error +0.0%
    1      on             592
    2      on             609    +17.1 KiB per layer (the layer input: 16 KiB)
    3      on             626    predicted from 1, 2: 626 MiB, error -0.0%
rl_lora.plan's model against the same runs (its no-checkpointing constants are fitted to depths 1 and 2; depth 3
and every checkpointed run are predictions): off 597 / 848 / 1100 MiB (depth 3: +0.0%), on 613 / 629 / 645 MiB
(+3.7% / +3.4% / +3.1%). Not measured: bf16 (too slow on this CPU; benchmarks/gpu_check.sh prints the plan's
figure beside the measured CUDA peak), sequence lengths other than 1024 (attention is flash on CPU and GPU: no
tokens^2 term), and the CUDA allocator's fragmentation (a fixed reserve in the plan).
Per token at Qwen3-8B's 36 layers in bf16 this gives 5.5 MiB without checkpointing and 0.63 MiB with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, vocab_size=4096)


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Qwen3Config

    from rl_lora.config import AdapterSpec
    from rl_lora.learner.learner import Learner, TrainSample

    torch.manual_seed(0)
    config = Qwen3Config(num_hidden_layers=args.layers, **QWEN3_8B)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    def build(path, dtype=None, **_):  # random weights from the config in code: nothing is read or downloaded
        return AutoModelForCausalLM.from_config(config, dtype=dtype)

    transformers.AutoModelForCausalLM.from_pretrained = build
    learner = Learner("qwen3-8b-shape", [AdapterSpec(lr=1e-4)], dtype=args.dtype,
                      tokens_per_microbatch=args.prompt + args.group * args.completion,
                      activation_checkpointing=args.ckpt, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist()
    batch = [TrainSample(prompt, torch.randint(0, config.vocab_size, (args.completion,), generator=g).tolist(),
                         [-8.0] * args.completion, 1.0 if i % 2 else -1.0) for i in range(args.group)]
    assert len(learner._microbatches(batch)) == 1
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    learner.train_step(batch)
    step_s = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"layers": args.layers, "ckpt": args.ckpt, "tokens": args.prompt + args.group * args.completion,
            "act_mib": (peak - before) / 1024, "weights_mib": before / 1024, "step_s": step_s,
            "dtype": str(dtype).replace("torch.", "")}


def _measure(args, layers, ckpt, prompt, completion, cache):
    key = (layers, bool(ckpt), prompt + args.group * completion, args.dtype, args.mmap_threshold)
    for r in cache:
        if (r["layers"], r["ckpt"], r["tokens"], r["dtype"], r.get("mmap_threshold", 0)) == key:
            return r
    cmd = [sys.executable, __file__, "--layers", str(layers), "--ckpt", str(int(ckpt)), "--prompt", str(prompt),
           "--completion", str(completion), "--group", str(args.group), "--dtype", args.dtype]
    env = dict(os.environ)
    if args.mmap_threshold:  # a fixed threshold: every large block is its own mapping, returned when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"depth {layers} ckpt {ckpt}: failed\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["mmap_threshold"] = args.mmap_threshold
    print(json.dumps(r), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(r) + "\n")
    cache.append(r)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=448)
    ap.add_argument("--group", type=int, default=2, help="completions of the prompt (GRPO's G)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ of the measured processes (0 = glibc's dynamic threshold, which "
                         "keeps freed blocks of up to 32 MiB in the heap and inflates the peak RSS)")
    ap.add_argument("--results", help="JSON lines of measurements: reused if present, appended to")
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.layers:
        args.ckpt = bool(args.ckpt)
        print(json.dumps(worker(args)))
        return
    from rl_lora.plan import LOGIT_CHUNK, activation_bytes_per_token
    from rl_lora.science import ModelShape

    shape = ModelShape("qwen3", 4096, 12288, 36, 32, 8, 128)
    nbytes = 4 if args.dtype == "float32" else 2
    cache = [json.loads(line) for line in open(args.results)] if args.results and Path(args.results).exists() else []
    P, C, T = args.prompt, args.completion, args.prompt + args.group * args.completion
    series = {ckpt: [_measure(args, L, ckpt, P, C, cache) for L in (1, 2, 3)] for ckpt in (0, 1)}
    print(f"\nQwen3-8B widths (vocabulary cut to 4096), {args.dtype}, one prompt of {P} + {args.group} completions of {C} "
          f"({T} tokens); peak RSS of the step above the RSS before it")
    for ckpt, (m1, m2, m3) in series.items():
        slope = m2["act_mib"] - m1["act_mib"]
        pred3 = m2["act_mib"] + slope
        print(f"checkpointing {'on ' if ckpt else 'off'}: {slope * 1024 / T:.1f} KiB/token per layer, depth 1 "
              f"{m1['act_mib'] * 1024 / T:.0f} KiB/token; depth 3 predicted from 1, 2: {pred3:.0f} MiB, measured "
              f"{m3['act_mib']:.0f} MiB, error {(pred3 - m3['act_mib']) / m3['act_mib']:+.1%}")
    print("\nrl_lora.plan's model (activations + logits chunk) against every measurement:")
    print(f"{'depth':>6}{'ckpt':>6}{'tokens':>8}{'measured MiB':>14}{'plan MiB':>10}{'error':>8}")
    for r in series[0] + series[1]:
        L = r["layers"]
        planned = (activation_bytes_per_token(shape, nbytes, r["ckpt"], layers=L) * r["tokens"]
                   + LOGIT_CHUNK * 4096 * (8 + nbytes)) / 2**20
        print(f"{L:>6}{int(r['ckpt']):>6}{r['tokens']:>8}{r['act_mib']:>14.0f}{planned:>10.0f}"
              f"{(planned - r['act_mib']) / r['act_mib']:>+8.1%}")


if __name__ == "__main__":
    main()
