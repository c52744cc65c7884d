"""rl_lora/seeds.py: the request seeds a run's steps and evals are sampled with. These values are what every run
so far used (the golden runs included): a change here changes every sampled completion."""

from rl_lora.seeds import request_seeds, step_seed


def test_request_seeds_are_spaced_by_the_samples_per_prompt():
    assert request_seeds(100, 3, 8) == [100, 108, 116]  # vLLM gives the 8 children of seed s the seeds s..s+7
    assert request_seeds(5, 0, 4) == []


def test_step_seeds_depend_on_the_run_seed_and_the_step_only():
    assert step_seed(0, 1) == 10_000 and step_seed(0, 2) == 20_000
    assert step_seed(1, 0) == 1_000_003 * 10_000
    # a step's P prompts x G samples fit below the next step's base: no seed is used twice in a run
    assert request_seeds(step_seed(0, 1), 100, 16)[-1] + 15 < step_seed(0, 2)
