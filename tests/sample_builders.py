"""Random TrainSamples for learner tests: one builder, each test picks its shapes. Token ids are drawn above the
byte tokenizer's specials; group members share their prompt (the shared-prompt path, GRPO's groups)."""

import random

from rl_lora.learner import TrainSample


def random_samples(seed: int = 0, *, groups: int, group_size: int = 1, adapters: int = 1, adapter: int = 0,
                   vocab: tuple[int, int] = (3, 200), prompt_len: tuple[int, int] = (3, 12),
                   completion_len: tuple[int, int] = (1, 9), logprob: float | None = None,
                   advantages: tuple[float, ...] | None = None, shuffle: bool = False) -> list[TrainSample]:
    """`adapters` x `groups` groups of `group_size` completions (adapter ids `adapter`, `adapter` + 1, ...).
    Lengths and ids are `randrange` ranges (upper end excluded). Sampler logprobs: `logprob` for every token, or
    -5 + U(0, 1) per token (None). Advantages: drawn from `advantages`, or U(-1, 1) (None)."""
    rng = random.Random(seed)
    out = []
    for k in range(adapters):
        for _ in range(groups):
            prompt = [rng.randrange(*vocab) for _ in range(rng.randrange(*prompt_len))]
            for _ in range(group_size):
                completion = [rng.randrange(*vocab) for _ in range(rng.randrange(*completion_len))]
                lps = [logprob] * len(completion) if logprob is not None else [-5.0 + rng.random() for _ in completion]
                adv = rng.choice(advantages) if advantages is not None else rng.uniform(-1, 1)
                out.append(TrainSample(prompt, completion, lps, adv, adapter + k))
    if shuffle:
        rng.shuffle(out)
    return out
