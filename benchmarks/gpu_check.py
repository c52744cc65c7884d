"""One-GPU learner check: our rank-1 learner vs stock HF + PEFT rank 1 vs full fine-tuning, bf16, Llama-3.1-8B widths.

No vLLM and no download: torch, transformers and peft only; random weights built from a config in code (Llama-3.1-8B
widths: hidden 4096, d_ff 14336, 32 heads, 8 KV heads, vocabulary 128256). Every mode runs in its own process (clean
peak-memory counters) on the same GRPO batch: one prompt and G completions of it, the advantages +-1.

- ours: rl_lora.learner.learner.Learner, rank-1 LoRA on every linear layer (prompt shared across its completions, logits
  only at completion positions, in chunks);
- peft: stock HF + PEFT rank 1 on the same layers: full-sequence forward of every completion, full-vocabulary
  logits, the usual way a trainer computes logprobs;
- full: our learner with every parameter trained (AdamW).
Activation checkpointing is on in every mode by default (as in the 8B recipes); --no-checkpointing turns it off.
Depth: --layers (default 16 of the real 32, the same for all modes) because full fine-tuning of all 32 layers with
fp32 master weights and AdamW needs ~145 GB; the table says which depth it measured.

tokens/s = completion tokens trained per second (the same tokens in every mode); peak = torch.cuda.max_memory_allocated
over the timed steps, weights included. `--tiny` runs the same code on CPU with a 2-layer, 128-wide model (a smoke
test: no timing or memory claims).

    benchmarks/gpu_check.sh [--layers 16] [--group 8] [--prompt 256] [--completion 1024] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            vocab_size=320, max_position_embeddings=2048, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=args.layers, **(TINY if args.tiny else LLAMA31_8B))


def _build(args, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(_config(args), dtype=dtype)


def _batch(args, vocab):
    import torch

    from rl_lora.learner.learner import TrainSample

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.prompt,), generator=g).tolist()
    return [TrainSample(prompt, torch.randint(0, vocab, (args.completion,), generator=g).tolist(),
                        [-8.0] * args.completion, 1.0 if i % 2 else -1.0) for i in range(args.group)]


def planned_gib(args, mode: str) -> float | None:
    """rl-lora plan's learner figure for this model and batch (ours and full; PEFT is not our learner)."""
    if mode not in ("ours", "full"):
        return None
    from rl_lora.plan import learner_rows
    from rl_lora.science import ModelShape, adapter_parameters

    c = TINY if args.tiny else LLAMA31_8B
    shape = ModelShape("llama", c["hidden_size"], c["intermediate_size"], args.layers, c["num_attention_heads"],
                       c["num_key_value_heads"], c["head_dim"])
    rows = learner_rows(shape, c["vocab_size"], False, 2, mode == "full", adapter_parameters(shape, 1, TARGETS),
                        args.prompt + args.group * args.completion, not args.no_checkpointing, args.prompt, args.group)
    return sum(gib for label, gib, _ in rows if label != "CUDA context, slack")  # allocated bytes only


def worker(args) -> dict:
    import torch
    import transformers

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.bfloat16
    ckpt = not args.no_checkpointing
    if args.mode == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(_build(args, device, dtype),
                               LoraConfig(r=1, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        batch = _batch(args, model.config.vocab_size)
        ids = torch.tensor([s.prompt_ids + s.completion_ids for s in batch], device=device)
        adv = torch.tensor([s.advantage for s in batch], device=device)

        def step():
            logits = model(input_ids=ids).logits[:, args.prompt - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, args.prompt:, None]).squeeze(-1)
            ratio = torch.exp(logp - logp.detach())
            (-(ratio * adv[:, None]).sum() / ratio.numel()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        trainable = sum(p.numel() for p in params)
    else:
        from rl_lora.config import AdapterSpec
        from rl_lora.learner.learner import Learner

        # random weights from the config in code, on the device: nothing is read or downloaded
        auto, auto_config = transformers.AutoModelForCausalLM, transformers.AutoConfig
        originals = auto.__dict__["from_pretrained"], auto_config.__dict__["from_pretrained"]
        auto.from_pretrained = lambda path, dtype=None, **_: _build(args, device, dtype)
        auto_config.from_pretrained = lambda path, **_: _config(args)
        try:
            kwargs = dict(dtype="bfloat16", activation_checkpointing=ckpt, device=device,
                          tokens_per_microbatch=args.prompt + args.group * (args.prompt + args.completion))
            learner = (Learner.full_model("llama-3.1-8b-shape", lr=1e-4, **kwargs) if args.mode == "full" else
                       Learner("llama-3.1-8b-shape", [AdapterSpec(target_modules=list(TARGETS), lr=1e-4)], **kwargs))
        finally:
            auto.from_pretrained, auto_config.from_pretrained = originals
        batch = _batch(args, learner.model.config.vocab_size)
        assert len(learner._microbatches(batch)) == 1  # the budget covers the prompt's K/V copies too

        def step():
            learner.train_step(batch)
        trainable = learner.num_trainable()
    cuda = device == "cuda"
    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    return {"mode": args.mode, "trainable": trainable, "step_s": step_s,
            "tokens_per_s": args.group * args.completion / step_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "vllm_imported": any(m == "vllm" or m.startswith("vllm.") for m in sys.modules),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, help="decoder layers, every mode (default 16; --tiny: 2)")
    ap.add_argument("--group", type=int, default=8, help="completions of the prompt (GRPO's G)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--completion", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (mean is reported)")
    ap.add_argument("--modes", default="ours,peft,full")
    ap.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off in every mode")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 layers of width 128")
    ap.add_argument("--in-process", action="store_true", help="run the modes in this process (smoke tests)")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.layers is None:
        args.layers = 2 if args.tiny else 16
    if args.tiny:
        args.prompt, args.completion, args.group, args.steps = min(args.prompt, 16), min(args.completion, 32), \
            min(args.group, 4), 1
    if args.mode:
        print(json.dumps(worker(args)))
        return 0
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible (use --tiny for the CPU smoke test)", file=sys.stderr)
            return 2
    results = []
    for mode in args.modes.split(","):
        if args.in_process:
            results.append(worker(argparse.Namespace(**{**vars(args), "mode": mode})))
            continue
        cmd = [sys.executable, __file__, "--mode", mode, "--layers", str(args.layers), "--group", str(args.group),
               "--prompt", str(args.prompt), "--completion", str(args.completion), "--steps", str(args.steps)]
        cmd += ["--tiny"] * args.tiny + ["--no-checkpointing"] * args.no_checkpointing
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            results.append({"mode": mode, "error": "out of memory" if "OutOfMemory" in out.stderr else last})
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    shape = "tiny Llama (CPU smoke test)" if args.tiny else "Llama-3.1-8B widths, random weights"
    device = next((r["device"] for r in results if "device" in r), "?")
    print(f"\nlearner step, bf16, {shape}, {args.layers} layers, 1 prompt of {args.prompt} + {args.group} completions "
          f"of {args.completion} tokens, activation checkpointing {'off' if args.no_checkpointing else 'on'}; {device}")
    print("| mode | trainable | step s | completion tokens/s | peak GiB | rl-lora plan GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        plan = planned_gib(args, r["mode"])
        plan = f"{plan:.1f}" if plan is not None else "-"
        if "error" in r:
            print(f"| {r['mode']} | - | - | - | failed: {r['error'][:80]} | {plan} |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a (CPU)"
        print(f"| {r['mode']} | {r['trainable']:,} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | {peak} | {plan} |")
    print("vllm imported by any mode: " + ("YES" if any(r.get("vllm_imported") for r in results) else "no"))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
