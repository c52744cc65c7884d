"""How far one optimizer step moves the policy: rank-1 LoRA vs sub-rank-1 scalars adapters (rl_lora/learner/tinylora.py), to
set the scalars' suggested LR (science.SCALARS_LR).

One learner carries every variant as an adapter (K adapters, each with the same batch: completions the base model
sampled on the demo task, advantages +-1), takes ONE AdamW step, and measures on other completions of other
prompts the mean |logp_after - logp_before| per token (the policy's movement; before = the base, every adapter
starting at the base). Adam's first step moves each parameter by ~lr whatever its gradient's size, so the
movement is a property of the parametrisation at that LR; the scalars' LR at which it matches rank-1 LoRA's at
its good LRs (README: 1e-4..1e-3 on this task) is the suggestion. It is not an RL sweep: which LR learns best is
measured by the grid's RL runs.

    python benchmarks/scalars_lr.py [--model smollm2-135m-gguf]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl_lora.config import ALL_LINEAR, AdapterSpec, DataConfig, ScalarsConfig  # noqa: E402
from rl_lora.data import load_problems, prompt_token_ids  # noqa: E402
from rl_lora.learner.learner import Learner  # noqa: E402
from rl_lora.models import resolve_model_path  # noqa: E402
from rl_lora.rollout import TrainSample  # noqa: E402

VARIANTS = [("lora r1", None, [3e-4, 1e-3]), ("scalars 1/none/random", ScalarsConfig(), [1e-2, 1e-1])] + [
    (f"scalars {c}/{share}/{d}", ScalarsConfig(count=c, share=share, directions=d), [3e-2])
    for c, share, d in [(1, "none", "svd"), (1, "model", "random"), (13, "model", "random")]]


def completions(model, tok, prompts, n, max_tokens, seed):
    """n sampled completions (T = 0.7) of each prompt from the base model, as TrainSamples (advantages +-1)."""
    torch.manual_seed(seed)
    out = []
    for ids in prompts:
        x = torch.tensor([ids] * n)
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=0.7,
                               max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        for j, row in enumerate(y[:, len(ids):].tolist()):
            out.append(TrainSample(ids, row, [0.0] * len(row), 1.0 if j % 2 else -1.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-gguf")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    path = resolve_model_path(args.model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    data = DataConfig(max_operand=20, operations="+-", train_size=200, eval_size=16)
    train, held_out = load_problems(data)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = completions(base, tok, [prompt_token_ids(tok, p, data) for p in train[:args.prompts]], args.samples,
                        24, seed=0)
    probe = completions(base, tok, [prompt_token_ids(tok, p, data) for p in held_out[:args.prompts]], 2, 24, seed=1)
    del base
    specs = [AdapterSpec(name=f"{name} lr={lr:g}", rank=sc.count if sc else 1, target_modules=list(ALL_LINEAR),
                         lr=lr, scalars=sc) for name, sc, lrs in VARIANTS for lr in lrs]
    learner = Learner(path, specs, temperature=0.7)
    before = torch.tensor([x for lp in learner.score(probe) for x in lp])
    learner.train_step([TrainSample(s.prompt_ids, s.completion_ids, s.sampler_logprobs, s.advantage, k)
                        for k in range(len(specs)) for s in batch])
    rows = []
    for k, spec in enumerate(specs):
        after = torch.tensor([x for lp in learner.score([TrainSample(s.prompt_ids, s.completion_ids,
                                                                     s.sampler_logprobs, 0.0, k) for s in probe])
                              for x in lp])
        rows.append({"adapter": spec.name, "lr": spec.lr, "trainable": sum(p.numel() for p in learner.param_sets[k]),
                     "movement": (after - before).abs().mean().item()})
        print(f"{spec.name:34s} {rows[-1]['trainable']:>9,} params   mean |d logp| per token "
              f"{rows[-1]['movement']:.2e}", flush=True)
    out = {"model": args.model, "probe_tokens": int(before.numel()), "batch": len(batch), "rows": rows,
           "time_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
