"""Shared rollout types: what the sampler returns (Completion, Group) and the learner consumes (TrainSample)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    token_ids: list[int]
    # log p_sampler(token_t) under the distribution actually sampled (temperature applied): the
    # importance-sampling denominator. Never recomputed by the learner (house rule 6).
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (EOS / stop string) or "length" (hit max_tokens)
    adapter_version: int  # 0 = base model, else the adapter version that produced it


@dataclass
class Group:
    """One prompt and its G completions (the unit that advantages are centred on)."""

    problem_index: int
    prompt: str
    prompt_ids: list[int]
    completions: list[Completion]
    rewards_G: list[float] = field(default_factory=list)
    failed_G: list[bool] = field(default_factory=list)  # its reward call failed or timed out: no real score
    advantages_G: list[float | None] = field(default_factory=list)  # None: left out of the loss (failed reward)
    adapter: int = 0  # index of the run's adapter that sampled it (K > 1: sweeps, tenants)


@dataclass
class TrainSample:
    """One completion as the learner sees it: its prompt, its tokens with the sampler's logprobs, its advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]
    advantage: float
    adapter: int = 0  # which adapter of the run produced it (and is trained on it)
