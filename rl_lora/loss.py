"""Policy-gradient losses with importance-sampling correction, as pure functions of per-token tensors.

Objective (LoRA Without Regret, GRPO-like): maximise sum_t rho_t * A, rho_t = p_learner(y_t) / p_sampler(y_t),
where p_sampler is the logprob the sampler reported for the token it sampled (never recomputed), and A is the
sequence's group-centred advantage. Token-level normalisation: the sum over every completion token of the
step is divided by the step's total completion-token count (not per sequence), so long and short answers
weigh each token equally (as in DAPO / Dr. GRPO).

Two variants, each its own function:
- `truncated_is_loss` (default): value -sum min(rho, cap) * A; gradient min(rho, cap) * A * grad log p_learner
  (truncated importance sampling: bounded variance when the sampler and learner disagree).
- `ppo_clip_loss`: -sum min(rho * A, clip(rho, 1-eps, 1+eps) * A) (PPO's pessimistic clipped surrogate).

Logged: mean/max rho, fraction truncated or clipped, and KL(sampler || learner) by the k3 estimator
E_sampler[rho - 1 - log rho] (non-negative, unbiased). At the first step of an on-policy run rho must be ~1:
a gap means a stale adapter or mismatched logprobs (e.g. raw vs temperature-scaled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossInputs:
    logp_learner_T: torch.Tensor  # [N] log p_learner of each completion token (requires grad)
    logp_sampler_T: torch.Tensor  # [N] log p_sampler of the same tokens
    advantages_T: torch.Tensor  # [N] the sequence advantage, repeated over its tokens
    num_tokens: int  # completion tokens in the whole step (normaliser across micro-batches)


@dataclass
class LossOutputs:
    loss: torch.Tensor  # scalar, this micro-batch's share of the step loss
    metrics: dict  # sums over this micro-batch's tokens (divide by num_tokens for means), and maxima


def _ratio_stats(log_ratio_T: torch.Tensor, ratio_T: torch.Tensor, limited_T: torch.Tensor) -> dict:
    lr = log_ratio_T.detach()
    r = ratio_T.detach()
    return {
        "is/ratio_sum": r.sum().item(),
        "is/ratio_max": r.max().item() if r.numel() else 0.0,
        "is/limited_sum": limited_T.float().sum().item(),
        "is/kl_sum": (r - 1 - lr).sum().item(),
    }


def truncated_is_loss(inp: LossInputs, is_cap: float) -> LossOutputs:
    log_ratio_T = inp.logp_learner_T - inp.logp_sampler_T
    ratio_T = torch.exp(log_ratio_T)
    # weight_T has value min(rho, cap)/rho and no gradient, so weight*rho has value min(rho, cap) and
    # gradient min(rho, cap) * grad log p_learner.
    weight_T = (ratio_T.clamp(max=is_cap) / ratio_T).detach()
    pg_loss_T = -weight_T * ratio_T * inp.advantages_T
    loss = pg_loss_T.sum() / inp.num_tokens
    return LossOutputs(loss, _ratio_stats(log_ratio_T, ratio_T, ratio_T.detach() > is_cap))


def ppo_clip_loss(inp: LossInputs, eps: float) -> LossOutputs:
    log_ratio_T = inp.logp_learner_T - inp.logp_sampler_T
    ratio_T = torch.exp(log_ratio_T)
    pg_loss1_T = -inp.advantages_T * ratio_T
    pg_loss2_T = -inp.advantages_T * ratio_T.clamp(1 - eps, 1 + eps)
    pg_loss_T = torch.max(pg_loss1_T, pg_loss2_T)
    loss = pg_loss_T.sum() / inp.num_tokens
    return LossOutputs(loss, _ratio_stats(log_ratio_T, ratio_T, (pg_loss2_T > pg_loss1_T).detach()))
