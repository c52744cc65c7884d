"""Learner step time and peak memory: our rank-1 LoRA vs full fine-tuning vs stock HF+PEFT, same batch.

Modes: lora (our learner), full (our learner, every parameter trained), full-hf (stock HF full fine-tuning:
full-sequence, full-vocabulary logits), peft (stock HF + PEFT rank 1); our modes take the suffixes -ckpt
(activation checkpointing) and -noshare (one prompt forward per sequence instead of per group). Ratios are
printed against both full fine-tuning baselines. Each mode runs in its own process (peak RSS is per process),
one after the other in one invocation, so the ratios are measured side by side; --rounds N repeats the
sequence (min time, max memory per mode). Default batch: a GRPO step of 16 sequences x 192 tokens (64 prompt +
128 completion) of SmolLM2-135M in fp32, as in DEVELOPERS.md: 2 prompts x 8 completions (the demo's
samples_per_prompt; --group 1 makes every prompt distinct).

    python benchmarks/learner.py [--model smollm2-135m-gguf] [--seqs 16] [--group 8] [--prompt 64] [--completion 128]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _batch(args, vocab):
    import torch

    from rl_lora.learner.learner import TrainSample

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(args.seqs):
        if i % args.group == 0:
            p = torch.randint(0, vocab, (args.prompt,), generator=g).tolist()
        c = torch.randint(0, vocab, (args.completion,), generator=g).tolist()
        out.append(TrainSample(p, c, [-8.0] * args.completion, 1.0 if i % 2 else -1.0))
    return out


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args) -> dict:
    import torch

    from rl_lora.config import AdapterSpec
    from rl_lora.learner.learner import Learner
    from rl_lora.models import resolve_model_path

    path = resolve_model_path(args.model)
    if args.mode in ("peft", "full-hf"):
        return _stock_worker(args, path)
    kwargs = dict(tokens_per_microbatch=args.seqs * (args.prompt + args.completion),
                  activation_checkpointing="-ckpt" in args.mode, share_prompts="-noshare" not in args.mode)
    learner = (Learner.full_model(path, lr=1e-4, **kwargs) if args.mode.startswith("full") else
               Learner(path, [AdapterSpec(lr=1e-4)], **kwargs))
    loaded = _rss_gib()
    batch = _batch(args, learner.model.config.vocab_size)
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        learner.train_step(batch)
        times.append(time.perf_counter() - t0)
    return {"mode": args.mode, "step_s": min(times[1:]), "peak_gib": _rss_gib(), "after_load_gib": loaded,
            "trainable": learner.num_trainable(), "threads": torch.get_num_threads()}


def _stock_worker(args, path) -> dict:
    """Stock HF (+ PEFT for mode peft; all parameters for full-hf): full-sequence, full-vocabulary logits, the
    usual way a trainer computes logprobs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rl_lora.config import ALL_LINEAR

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if args.mode == "peft":
        model = get_peft_model(model, LoraConfig(r=1, lora_alpha=32, target_modules=ALL_LINEAR, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loaded = _rss_gib()
    batch = _batch(args, model.config.vocab_size)
    ids = torch.tensor([s.prompt_ids + s.completion_ids for s in batch])
    adv = torch.tensor([s.advantage for s in batch])
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits[:, args.prompt - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, args.prompt:, None]).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        loss = -(ratio * adv[:, None]).sum() / ratio.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return {"mode": args.mode, "step_s": min(times[1:]), "peak_gib": _rss_gib(), "after_load_gib": loaded,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-gguf")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO's G)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (min is reported)")
    ap.add_argument("--modes", default="lora,lora-ckpt,full,full-hf,peft")
    ap.add_argument("--rounds", type=int, default=1, help="run every mode this many times, interleaved")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    results = {}
    for _ in range(args.rounds):  # rounds interleave the modes, so slow drifts of a shared machine hit all alike
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--seqs", str(args.seqs),
                   "--group", str(args.group),
                   "--prompt", str(args.prompt), "--completion", str(args.completion), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{mode}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if mode in results:  # best time, worst memory over the rounds
                r["step_s"] = min(r["step_s"], results[mode]["step_s"])
                r["peak_gib"] = max(r["peak_gib"], results[mode]["peak_gib"])
            results[mode] = r
    print(f"\nlearner step, {args.seqs} x {args.prompt + args.completion} tokens ({args.seqs // args.group} prompts x "
          f"{args.group}), model {args.model}")
    full, hf = results.get("full"), results.get("full-hf")

    def ratio(r, base, key):
        return f"{r[key] / base[key]:.2f}x" if base else "-"

    print(f"{'mode':<14}{'trainable':>12}{'step s':>8}{'peak GiB':>10}{'loaded':>8}"
          f"{'time/full':>11}{'mem/full':>10}{'time/full-hf':>14}{'mem/full-hf':>13}")
    for mode, r in results.items():
        print(f"{mode:<14}{r['trainable']:>12,}{r['step_s']:>8.1f}{r['peak_gib']:>10.2f}{r['after_load_gib']:>8.2f}"
              f"{ratio(r, full, 'step_s'):>11}{ratio(r, full, 'peak_gib'):>10}"
              f"{ratio(r, hf, 'step_s'):>14}{ratio(r, hf, 'peak_gib'):>13}")


if __name__ == "__main__":
    main()
