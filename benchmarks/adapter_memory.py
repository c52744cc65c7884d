"""Where the memory of K adapters goes, phase by phase: RSS after building the learner (K rank-1 adapters), the
in-process vLLM engine (K + 1 LoRA slots), the push of all K, one generate of 16 distinct prompts x 2 samples
shared out over the K adapters (equal tokens and 16 (prompt, adapter) groups for every K up to 16), a learner
scoring and two train steps of those samples.

    python benchmarks/adapter_memory.py 1; python benchmarks/adapter_memory.py 8    # compare the rows
    python benchmarks/adapter_memory.py 8 --same-prompt   # the earlier setup: ONE prompt repeated 16 times

Why distinct prompts: the learner computes a prompt once per (prompt, adapter) group and shares it across the
group's samples (rl_lora/learner/prefix.py). With one prompt repeated, K = 1 has one group and K = 16 has 16, so
the activations grew with K through the groups, not through the adapters (measured 2026-12-02, learner alone,
SmolLM2: ~90 MiB "per adapter" that way, ~27 MiB with distinct prompts, the rest a fixed cost of mixing
adapters in a micro-batch: README, "K at scale").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS, SAMPLES = 16, 2


def rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**30


def main(K: int, model: str = "smollm2-135m-gguf", same_prompt: bool = False) -> None:
    import torch

    from rl_lora.config import ALL_LINEAR, AdapterSpec
    from rl_lora.learner.learner import Learner
    from rl_lora.models import resolve_model_path
    from rl_lora.rollout import TrainSample
    from rl_lora.sampling.sampler import Sampler

    if PROMPTS % K:
        raise SystemExit(f"K must divide {PROMPTS}")
    rows = [("start", rss_gib())]
    path = resolve_model_path(model)
    learner = Learner(path, [AdapterSpec(f"a{k}", target_modules=ALL_LINEAR, lr=1e-4) for k in range(K)],
                      tokens_per_microbatch=8192)
    rows.append(("learner", rss_gib()))
    sampler = Sampler(path, max_loras=K + 1, max_model_len=512)
    rows.append(("engine", rss_gib()))
    with torch.no_grad():
        for m in learner.adapters.values():
            m.lora_B.normal_(0, 0.01)
    tensors = learner.peft_tensors(learner.snapshot())
    refs = sampler.push_many([(k + 1, t, learner.peft_config(k)) for k, t in enumerate(tensors)], evict=[])
    rows.append(("push", rss_gib()))
    per = PROMPTS // K
    prompts = [list(range(100, 160)) if same_prompt else list(range(100 + 60 * i, 160 + 60 * i))
               for i in range(PROMPTS)]
    groups = sampler.generate(prompts, n=SAMPLES, adapters=[r for r in refs for _ in range(per)], seed=0,
                              seeds=list(range(PROMPTS)), temperature=0.7, max_tokens=16)
    rows.append(("generate", rss_gib()))
    samples = [TrainSample(prompts[i], c.token_ids, c.logprobs, 1.0 if j % 2 else -1.0, i // per)
               for i, g in enumerate(groups) for j, c in enumerate(g)]
    learner.score(samples)
    rows.append(("score", rss_gib()))
    for n in (1, 2):
        learner.train_step(samples)
        rows.append((f"train_step {n}", rss_gib()))
    print(f"K = {K}, {model}, {'one prompt repeated' if same_prompt else 'distinct prompts'}: RSS GiB after each "
          "phase (growth)")
    for (name, gib), (_, before) in zip(rows, [rows[0], *rows]):
        print(f"  {name:<13}{gib:7.2f}  {gib - before:+6.2f}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]) if args else 1, same_prompt="--same-prompt" in sys.argv)
