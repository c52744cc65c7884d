"""Group-centred advantages (GRPO without the std division by default).

A_i = r_i - mean(r_group). Optionally divided by the group's std (scale_by_std). Groups whose rewards are all
equal have A = 0 for every member: they carry no policy-gradient signal, so they are dropped (and counted)
rather than spent on learner compute.
"""

from __future__ import annotations

import torch


def group_advantages(rewards_G: torch.Tensor, scale_by_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards_G: [G] rewards of one group -> advantages_G: [G]."""
    advantages_G = rewards_G - rewards_G.mean()
    if scale_by_std:
        advantages_G = advantages_G / (rewards_G.std(unbiased=False) + eps)
    return advantages_G


def has_signal(rewards_G: torch.Tensor, tol: float = 1e-8) -> bool:
    return bool((rewards_G.max() - rewards_G.min()).abs() > tol)
