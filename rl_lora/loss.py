"""Policy-gradient losses with importance-sampling correction, as pure functions of per-token tensors.

Objective (LoRA Without Regret, GRPO-like): maximise sum_t rho_t * A, rho_t = p_learner(y_t) / p_sampler(y_t),
where p_sampler is the logprob the sampler reported for the token it sampled (never recomputed), and A is the
sequence's group-centred advantage. Token-level normalisation: the sum over every completion token of the
step is divided by the step's total completion-token count (not per sequence), so long and short answers
weigh each token equally (as in DAPO / Dr. GRPO).

Each variant is its own pure function `LossInputs -> LossOutputs` (given its settings), registered in LOSSES with
the condition under which the config selects it; `build_loss(cfg.loss)` picks one once, at setup, and the learner
only ever calls the function it was given. A new loss is one function plus one `register` line.
Two variants:
- `truncated_is_loss` (default): value -sum min(rho, cap) * A; gradient min(rho, cap) * A * grad log p_learner
  (truncated importance sampling: bounded variance when the sampler and learner disagree).
- `ppo_clip_loss`: -sum min(rho * A, clip(rho, 1-eps, 1+eps) * A) (PPO's pessimistic clipped surrogate), with
  `loss.is_cap` as the dual-clip bound c (Ye et al. 2020, "Mastering Complex Control in MOBA Games", sec. 3.2):
  a token with A < 0 contributes at most c * |A| to the loss, and no gradient once rho > c (plain PPO's A < 0
  term grows without bound in rho). For A > 0 PPO's own clip at 1 + eps already binds first.

rho is computed in log space: log rho = logp_learner - logp_sampler is clamped before it is exponentiated, so
an extreme ratio gives a token weight of 0 (log rho < -104 underflows to rho = 0 in fp32) or the cap, never
0/0 or inf*0 = NaN for the whole step. Only a non-finite input (a NaN logprob) makes the step non-finite (and
skipped by the learner). With is_cap = inf (no cap) rho is held at e^88, the float32 limit.

Logged: mean/max rho, fraction truncated or clipped, and KL(sampler || learner) by the k3 estimator
E_sampler[rho - 1 - log rho] (non-negative, unbiased), in float64, as 0-d tensors (the learner sums them on the
device and syncs to the host once per step). At the first step of an on-policy run rho
must be ~1: a gap means a stale adapter or mismatched logprobs (e.g. raw vs temperature-scaled).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

# exp(88.7) is the largest float32; float64 statistics are clamped well inside exp's range.
_LOG_FLOAT32_MAX = 88.0
_LOG_STATS_MAX = 700.0


@dataclass
class LossInputs:
    logp_learner_T: torch.Tensor  # [N] log p_learner of each completion token (requires grad)
    logp_sampler_T: torch.Tensor  # [N] log p_sampler of the same tokens
    advantages_T: torch.Tensor  # [N] the sequence advantage, repeated over its tokens
    num_tokens: int  # completion tokens in the whole step (normaliser across micro-batches)


@dataclass
class LossOutputs:
    loss: torch.Tensor  # scalar, this micro-batch's share of the step loss
    # 0-d float64 tensors: sums over this micro-batch's tokens (divide by num_tokens for means), and the maximum
    metrics: dict[str, torch.Tensor]


LossFn = Callable[[LossInputs], LossOutputs]


def _ratio_stats(log_ratio_T: torch.Tensor, limited_T: torch.Tensor) -> dict[str, torch.Tensor]:
    lr = log_ratio_T.detach().double().clamp(-_LOG_STATS_MAX, _LOG_STATS_MAX)  # NaN stays NaN
    r = lr.exp()
    return {
        "is/ratio_sum": r.sum(),
        "is/ratio_max": r.max() if r.numel() else r.new_zeros(()),
        "is/limited_sum": limited_T.double().sum(),
        "is/kl_sum": (r - 1 - lr).sum(),
    }


def _log_cap(cap: float) -> float:
    return math.log(cap) if math.isfinite(cap) else math.inf


def truncated_is_loss(inp: LossInputs, is_cap: float) -> LossOutputs:
    log_ratio_T = inp.logp_learner_T - inp.logp_sampler_T
    # weight_T = min(rho, cap), no gradient: in [0, cap] for any finite log ratio (exp underflows to 0).
    weight_T = log_ratio_T.detach().clamp(max=min(_log_cap(is_cap), _LOG_FLOAT32_MAX)).exp()
    # score_T has value 1 and gradient grad log p_learner, so weight * score has value min(rho, cap) and gradient
    # min(rho, cap) * grad log p_learner. Zero-weight tokens are left out of it (0 * a -inf logprob would be NaN).
    logp_T = torch.where(weight_T > 0, inp.logp_learner_T, torch.zeros_like(inp.logp_learner_T))
    score_T = torch.exp(logp_T - logp_T.detach())
    pg_loss_T = -weight_T * score_T * inp.advantages_T
    loss = pg_loss_T.sum() / inp.num_tokens
    return LossOutputs(loss, _ratio_stats(log_ratio_T, log_ratio_T.detach() > _log_cap(is_cap)))


def ppo_clip_loss(inp: LossInputs, eps: float, is_cap: float = math.inf) -> LossOutputs:
    log_ratio_T = inp.logp_learner_T - inp.logp_sampler_T
    # The unclipped term carries gradient only while rho <= max(1 + eps, cap): beyond it the clipped (or dual-clip)
    # term is the active one, so clamping log rho there changes no value or gradient, and keeps exp finite (an
    # overflowed rho would give inf * 0 = NaN in backward).
    hi = min(max(math.log1p(eps), _log_cap(is_cap)), _LOG_FLOAT32_MAX)
    ratio_T = torch.exp(log_ratio_T.clamp(max=hi))
    pg_loss1_T = -inp.advantages_T * ratio_T
    pg_loss2_T = -inp.advantages_T * ratio_T.clamp(1 - eps, 1 + eps)
    pg_loss_T = torch.max(pg_loss1_T, pg_loss2_T)
    clipped_T = pg_loss2_T > pg_loss1_T
    if math.isfinite(is_cap):  # dual clip: an A < 0 token costs at most cap * |A|
        bound_T = -inp.advantages_T * is_cap
        dual_T = (inp.advantages_T < 0) & (log_ratio_T.detach() > math.log(is_cap))
        pg_loss_T = torch.where(dual_T, bound_T, pg_loss_T)
        clipped_T = clipped_T | dual_T
    loss = pg_loss_T.sum() / inp.num_tokens
    return LossOutputs(loss, _ratio_stats(log_ratio_T, clipped_T.detach()))


# name -> (selected when, builder from the `loss:` config section). The first whose condition holds is chosen;
# truncated IS, registered last, always holds (the default).
LOSSES: dict[str, tuple[Callable[[object], bool], Callable[[object], LossFn]]] = {}


def register(name: str, when: Callable[[object], bool], build: Callable[[object], LossFn]) -> None:
    LOSSES[name] = (when, build)


register("ppo_clip", lambda c: c.ppo_clip > 0,
         lambda c: functools.partial(ppo_clip_loss, eps=c.ppo_clip, is_cap=c.is_cap))
register("truncated_is", lambda c: True, lambda c: functools.partial(truncated_is_loss, is_cap=c.is_cap))


def loss_name(loss_cfg) -> str:
    """The registered loss the `loss:` section selects."""
    return next(name for name, (when, _) in LOSSES.items() if when(loss_cfg))


def build_loss(loss_cfg) -> LossFn:
    """The step's loss function, chosen once from the `loss:` config section (a LossConfig)."""
    return LOSSES[loss_name(loss_cfg)][1](loss_cfg)
