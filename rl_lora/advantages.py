"""Group-centred advantages (GRPO without the std division by default).

A_i = r_i - mean(r_group). Optionally divided by the group's std (scale_by_std). Groups whose rewards are all
equal have A = 0 for every member: they carry no policy-gradient signal, so they are dropped (and counted)
rather than spent on learner compute. A completion whose reward call failed or timed out has no real reward: it
is left out of its group's mean and of the loss (its 0 is not a score), and a group with fewer than 2 scored
members left has no baseline and is dropped (`valid_group_advantages`).
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


def valid_group_advantages(rewards_G: torch.Tensor, valid_G: torch.Tensor, scale_by_std: bool = False
                           ) -> torch.Tensor | None:
    """Advantages of a group's valid (scored) members, centred on their own mean, NaN at the others; None when
    the group carries no signal: fewer than 2 valid members, or equal rewards among them."""
    if int(valid_G.sum()) < 2 or not has_signal(rewards_G[valid_G]):
        return None
    advantages_G = torch.full_like(rewards_G, float("nan"))
    advantages_G[valid_G] = group_advantages(rewards_G[valid_G], scale_by_std)
    return advantages_G
