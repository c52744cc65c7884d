"""The tests' builders of learners and of random TrainSamples (each test picks its shapes). Token ids are drawn
above the byte tokenizer's specials; group members share their prompt (the shared-prompt path, GRPO's groups)."""

import random

import torch

from rl_lora.config import AdapterSpec
from rl_lora.learner.learner import Learner, TrainSample


def random_samples(seed: int = 0, *, groups: int, group_size: int = 1, adapters: int = 1, adapter: int = 0,
                   vocab: tuple[int, int] = (3, 200), prompt_len: tuple[int, int] = (3, 12),
                   completion_len: tuple[int, int] = (1, 9), logprob: float | None = None,
                   advantages: tuple[float, ...] | None = None, shuffle: bool = False,
                   interleave: bool = False) -> list[TrainSample]:
    """`adapters` x `groups` groups of `group_size` completions (adapter ids `adapter`, `adapter` + 1, ...), in
    adapter order, or (`interleave`) the adapters' groups alternating. Lengths and ids are `randrange` ranges
    (upper end excluded). Sampler logprobs: `logprob` for every token, or -5 + U(0, 1) per token (None).
    Advantages: drawn from `advantages`, or U(-1, 1) (None). `shuffle`: the samples in random order."""
    rng = random.Random(seed)
    groups_K = []
    for k in range(adapters):
        groups_K.append([])
        for _ in range(groups):
            prompt = [rng.randrange(*vocab) for _ in range(rng.randrange(*prompt_len))]
            group = []
            for _ in range(group_size):
                completion = [rng.randrange(*vocab) for _ in range(rng.randrange(*completion_len))]
                lps = [logprob] * len(completion) if logprob is not None else [-5.0 + rng.random() for _ in completion]
                adv = rng.choice(advantages) if advantages is not None else rng.uniform(-1, 1)
                group.append(TrainSample(prompt, completion, lps, adv, adapter + k))
            groups_K[k].append(group)
    ordered = [g for gs in zip(*groups_K) for g in gs] if interleave else [g for gs in groups_K for g in gs]
    out = [s for g in ordered for s in g]
    if shuffle:
        rng.shuffle(out)
    return out


def perturb_B(learner: Learner, seed: int, scale: float = 0.02) -> None:
    """Non-zero B in every adapter (as after some training, so A gets gradients too), seeded: the same in every
    learner built with the same specs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for views in learner.adapter_sets:
            for name in sorted(views):
                views[name].lora_B.copy_(torch.randn(views[name].lora_B.shape, generator=gen) * scale)


def build_learner(path: str, *adapters: AdapterSpec, **kwargs) -> Learner:
    """The tests' learner: `adapters` on the model at `path`, or one default AdapterSpec (rank 1, alpha 32, every
    linear layer, lr 1e-4, seed 0); `kwargs` as Learner's (temperature, top_k, tokens_per_microbatch, ...)."""
    return Learner(path, list(adapters) or [AdapterSpec()], **kwargs)


def build_full_learner(path: str, lr: float = 1e-4, **kwargs) -> Learner:
    """The tests' full fine-tuning learner: every weight of the model at `path` trained at `lr`."""
    return Learner.full_model(path, lr=lr, **kwargs)


def base_and_peft_logits(model_path: str, adapter_dir, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's logits of `ids` and PEFT's with the adapter files in `adapter_dir` on top (the round trip
    the learner's export must pass)."""
    import peft
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        plain = base(input_ids=ids).logits
        return plain, peft.PeftModel.from_pretrained(base, adapter_dir)(input_ids=ids).logits


def chat_prompt(sampler, text: str = "What is 2 + 3?") -> list[int]:
    """`text` as a one-turn chat prompt, in the engine's tokenizer's ids."""
    ids = sampler.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def adapter_samples(adapter: int, seed: int, n: int = 6) -> list[TrainSample]:
    """n single-completion groups of one adapter, varied lengths, advantages of both signs."""
    return random_samples(seed, groups=n, adapter=adapter, prompt_len=(4, 12), completion_len=(2, 9),
                          advantages=(-1.0, -0.5, 0.5, 1.0))


def push_random_versions(sampler, learner, versions, std: float = 0.05) -> dict:
    """Each version: the learner's B drawn afresh (N(0, std)) and pushed to `sampler` beside the others (none
    evicted). Returns version -> the B tensors it was pushed with."""
    weights = {}
    for version in versions:
        with torch.no_grad():
            for m in learner.adapters.values():
                m.lora_B.normal_(0, std)
        weights[version] = [m.lora_B.detach().clone() for m in learner.adapters.values()]
        sampler.push(version, learner.write_adapter, evict_older=False)
    return weights


def version_gap(learner, weights: dict, prompt: list[int], group, version: int) -> float:
    """The largest |sampler - learner| logprob over `group`'s tokens, the learner's B set to `version`'s pushed
    tensors (push_random_versions; a version not in `weights`, e.g. 0 for base rows: B = 0)."""
    with torch.no_grad():
        for m, b in zip(learner.adapters.values(), weights.get(version) or [None] * len(learner.adapters)):
            m.lora_B.copy_(b if b is not None else torch.zeros_like(m.lora_B))
    scored = learner.score([TrainSample(prompt, c.token_ids, c.logprobs, 0.0) for c in group])
    return max(abs(a - b) for c, lp in zip(group, scored) for a, b in zip(c.logprobs, lp))
