"""The sampler's top-k / top-p truncation, replayed on the learner's logits so that both score the same policy.

vLLM samples from the truncated distribution and, with `logprobs_mode="processed_logprobs"`, reports
log p_trunc(y) = z_y/T - logsumexp over the kept tokens of z/T. A learner scoring the full softmax would see
rho = p_full / p_trunc < 1 on-policy (measured: is/ratio_mean 0.80 at top_p 0.8). The kept set is that of
vLLM 0.32 (vllm/v1/sample/ops/topk_topp_sampler.py, apply_top_k_top_p_pytorch and apply_top_k_only), on the
temperature-scaled fp32 logits:
- top-k: keep every token whose logit is >= the k-th largest (ties at the k-th are kept);
- top-p, after top-k: sort ascending, drop the tokens whose cumulative probability is <= 1 - p, keep the largest.
The kept set is piecewise constant in the weights, so d log p_trunc = d of the masked log-softmax (exact almost
everywhere). The sampled token itself is always kept: on-policy it is in the sampler's set anyway, and a token
at the set's edge that rounding (bf16, or GPU vLLM's Triton kernel) puts on the other side in the learner keeps a
finite logprob (its ratio off by its own tiny probability mass) instead of -inf.
Cost: top-p sorts each completion token's vocabulary row, as vLLM does (measured on this loaded 2-core CPU: 3-6 s per
64 tokens of a 151936-token vocabulary; a bisection on the threshold was slower here); top-k alone needs no sort.
"""

from __future__ import annotations

import torch


def active(top_k: int, top_p: float) -> bool:
    return top_k > 0 or top_p < 1.0


@torch.no_grad()
def dropped_mask(logits_NV: torch.Tensor, targets_N: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[N, V] bool: True where the sampler's truncation removes a token (never at the row's target)."""
    logits_NV = logits_NV.float()
    drop_NV = torch.zeros_like(logits_NV, dtype=torch.bool)
    if 0 < top_k < logits_NV.shape[-1]:
        kth_N1 = logits_NV.topk(top_k, dim=-1).values[:, -1:]
        drop_NV |= logits_NV < kth_N1
    if top_p < 1.0:
        sorted_NV, order_NV = logits_NV.masked_fill(drop_NV, float("-inf")).sort(dim=-1)
        cumulative_NV = sorted_NV.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted_NV = cumulative_NV <= 1 - top_p
        drop_sorted_NV[:, -1] = False
        drop_NV |= torch.zeros_like(drop_NV).scatter_(-1, order_NV, drop_sorted_NV)
    drop_NV[torch.arange(len(targets_N), device=drop_NV.device), targets_N] = False
    return drop_NV
