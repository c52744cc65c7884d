"""Per-request sampling seeds: the one place they are derived.

vLLM's per-request seeds are reproducible (its engine-level seed is not), and it gives the n children of a
request the seeds seed..seed+n-1, so the requests of one call are spaced n apart. A training step's base seed
is a function of the sample seed (`train.seed`, or an adapter's `sample_seed`) and the step only, so a resumed or
redone step samples the same random numbers, and adapters with the same sample seed are paired.
"""


def request_seeds(base: int, num_prompts: int, n: int) -> list[int]:
    """The request seed of each of `num_prompts` prompts sampled `n` times: base, base + n, base + 2n, ..."""
    return [base + i * n for i in range(num_prompts)]


def step_seed(run_seed: int, step: int) -> int:
    """The base request seed of training step `step` under sample seed `run_seed` (10_000 seeds apart per step)."""
    return (run_seed * 1_000_003 + step) * 10_000
