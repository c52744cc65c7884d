"""Learner step time and peak memory on a random MoE at realistic widths, with vs without rank-1 expert adapters.

The model: Qwen3-MoE with Qwen3-30B-A3B's widths (hidden 2048, 32 query / 4 KV heads of 128, 128 experts of
ffn 768, top-8 routing; `--experts` fewer where memory is short) and `--layers` decoder layers (1 by default: one
layer's 128 experts are 2.4 GB in fp32), the
byte tokenizer's small vocabulary (so the MoE layers, not the head, dominate), random weights, written once to a
temp directory. Modes, each in its own process (peak RSS is per process), one after the other in one invocation:

- attention: rank-1 LoRA on q/k/v/o only; the experts run the model's own forward (frozen, no adapter);
- all: rank-1 LoRA on attention and on every expert's gate/up/down (rl_lora/moe.py: expert rank auto = 1);
- all-ckpt: `all` with activation checkpointing.

    python benchmarks/moe.py [--layers 1] [--experts 128] [--seqs 8] [--prompt 64] [--completion 192] [--steps 2]

Measured (issue 16) on the 2-core CPU shared with five other jobs, so the times are rough: `--experts 64 --seqs 4
--prompt 32 --completion 96 --steps 1 --modes attention,all` (the default size did not finish under that load):
attention 26.1 s/step, 17,408 trainable; all 66.0 s/step (2.53x), 558,080 trainable; peak RSS 3.41 GiB in both
(reached while loading, so the adapters' activations stay below it at this batch).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
WIDTHS = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
              decoder_sparse_step=1)  # Qwen3-30B-A3B's config.json


def build(target: Path, layers: int, experts: int) -> Path:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tests.tiny_models import TINY_VOCAB, byte_tokenizer, save_tiny, special_ids

    fast = byte_tokenizer(target)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=TINY_VOCAB, num_hidden_layers=layers, max_position_embeddings=4096,
                            tie_word_embeddings=False, **special_ids(fast), **{**WIDTHS, "num_experts": experts})
    return save_tiny(Qwen3MoeForCausalLM(config), fast, target)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args) -> dict:
    import torch

    from rl_lora.config import ALL_LINEAR
    from rl_lora.learner import Learner, TrainSample

    targets = ATTENTION if args.mode == "attention" else ALL_LINEAR
    learner = Learner(args.path, rank=1, target_modules=targets, lr=1e-4,
                      tokens_per_microbatch=args.seqs * (args.prompt + args.completion),
                      activation_checkpointing=args.mode.endswith("-ckpt"))
    loaded = _rss_gib()
    g = torch.Generator().manual_seed(0)
    vocab = learner.model.config.vocab_size
    batch = [TrainSample(torch.randint(3, vocab, (args.prompt,), generator=g).tolist(),
                         torch.randint(3, vocab, (args.completion,), generator=g).tolist(), [-5.0] * args.completion,
                         1.0 if i % 2 else -1.0) for i in range(args.seqs)]
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        learner.train_step(batch)
        times.append(time.perf_counter() - t0)
    return {"mode": args.mode, "step_s": min(times[1:]), "peak_gib": _rss_gib(), "after_load_gib": loaded,
            "trainable": learner.num_trainable(), "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=128, help="routed experts per layer (Qwen3-30B-A3B: 128)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (min is reported)")
    ap.add_argument("--modes", default="attention,all,all-ckpt")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build(Path(args.build), args.layers, args.experts)
        return
    if args.mode:
        print(json.dumps(worker(args)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="rl-lora-moe-bench-"))
    try:
        path = tmp / "model"  # built in its own process, so this one holds no weights while the modes run
        subprocess.run([sys.executable, __file__, "--build", str(path), "--layers", str(args.layers), "--experts",
                        str(args.experts)], check=True, capture_output=True)
        results = {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--mode", mode, "--path", str(path), "--seqs", str(args.seqs),
                   "--prompt", str(args.prompt), "--completion", str(args.completion), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{mode}: failed\n{out.stderr[-2000:]}")
                continue
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = args.seqs * (args.prompt + args.completion)
    print(f"\nlearner step on a random Qwen3-MoE, {args.layers} layer(s) of Qwen3-30B-A3B widths (hidden 2048, "
          f"{args.experts} experts x ffn 768, top-8), {args.seqs} x {args.prompt + args.completion} = {tokens} tokens, "
          "fp32")
    base = results.get("attention")
    print(f"{'mode':<11}{'trainable':>12}{'step s':>8}{'peak GiB':>10}{'loaded':>8}{'time/attn':>11}{'mem/attn':>10}")
    for mode, r in results.items():
        rt = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        rm = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base else "-"
        print(f"{mode:<11}{r['trainable']:>12,}{r['step_s']:>8.2f}{r['peak_gib']:>10.2f}{r['after_load_gib']:>8.2f}"
              f"{rt:>11}{rm:>10}")


if __name__ == "__main__":
    main()
