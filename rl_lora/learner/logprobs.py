"""Per-token logprobs of completion tokens from the final hidden states, through the model's own output layer.

Logits are computed only at completion positions, in chunks of LOGIT_CHUNK tokens. With a frozen output layer
(LoRA) a chunk's gradient with respect to its hidden states is computed in the same pass as its logprobs and
kept ([tokens, hidden], small), so the [tokens, vocab] logits are neither stored nor recomputed; full fine-tuning
(which needs the output layer's weight gradient) recomputes the chunk's logits in backward. The sampler's top-k /
top-p truncation is replayed on the logits (rl_lora/truncation.py).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from rl_lora import truncation
from rl_lora.learner import heads

LOGIT_CHUNK = 256  # completion tokens per logits chunk: 256 x 49k vocab x 4 B = 50 MB transient


def chunk_token_logprobs(hidden_N: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets_N: torch.Tensor, head: heads.Head, inv_temperature: float, top_k: int = -1,
                         top_p: float = 1.0) -> torch.Tensor:
    logits_NV = heads.logits(hidden_N, weight, bias, head, inv_temperature)
    if truncation.active(top_k, top_p):  # the sampler's top-k / top-p set (rl_lora/truncation.py)
        logits_NV = logits_NV.masked_fill(truncation.dropped_mask(logits_NV, targets_N, top_k, top_p), float("-inf"))
    return logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - logits_NV.logsumexp(-1)


class FrozenHeadLogprobs(torch.autograd.Function):
    """log softmax(l)[target] for a frozen output layer, l = softcap(s (h W^T + b)) / T, with d/dh computed in the
    forward pass: d logp_t / d l = e_y - softmax(l) does not depend on the upstream gradient, so backward is one
    multiply and the chunk's [tokens, vocab] logits die in forward (3 vocab-sized matmuls become 2). With
    soft-capping c tanh(z / c), dl/dz = (1 - tanh^2(z / c)) / T, so the row is weighted by it before the product
    with W: d logp / d h = s/T ((1 - tanh^2_y) W[y] - (softmax(l) (1 - tanh^2)) W)."""

    @staticmethod
    def forward(ctx, hidden_N, weight, bias, targets_N, head, inv_temperature, top_k=-1, top_p=1.0):
        z_NV = torch.nn.functional.linear(hidden_N, weight, bias).float()
        if head.scale != 1.0:
            z_NV.mul_(head.scale)
        slope_NV = None
        if head.softcap:
            z_NV = z_NV.div_(head.softcap).tanh_()
            slope_NV = 1 - z_NV * z_NV  # d tanh(u)/du, u = z / c
            z_NV.mul_(head.softcap)
        logits_NV = z_NV.mul_(inv_temperature)
        if truncation.active(top_k, top_p):  # dropped tokens get probability 0 in the softmax below
            logits_NV.masked_fill_(truncation.dropped_mask(logits_NV, targets_N, top_k, top_p), float("-inf"))
        lse_N = logits_NV.logsumexp(-1)
        logp_N = logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - lse_N
        probs_NV = logits_NV.sub_(lse_N[:, None]).exp_()  # in place: the logits are not needed any more
        rows_Nd = weight[targets_N].float()
        if slope_NV is not None:
            rows_Nd = rows_Nd * slope_NV.gather(-1, targets_N[:, None])
            probs_NV.mul_(slope_NV)
        dlogp_dh = (rows_Nd - probs_NV.to(weight.dtype) @ weight) * (head.scale * inv_temperature)
        ctx.save_for_backward(dlogp_dh.to(hidden_N.dtype))
        return logp_N

    @staticmethod
    def backward(ctx, grad_N):
        (dlogp_dh,) = ctx.saved_tensors
        return grad_N[:, None].to(dlogp_dh.dtype) * dlogp_dh, None, None, None, None, None, None, None


def completion_logprobs(hidden_N: torch.Tensor, targets_N: torch.Tensor, output: torch.nn.Module, head: heads.Head,
                        inv_temperature: float, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """[N] log p(targets_N) from the hidden states that predict them, chunk by chunk: no grad (scoring), the
    frozen-head function (LoRA), or a checkpointed chunk whose logits are recomputed in backward (full FT)."""
    weight, bias = output.weight, output.bias
    out = []
    for start in range(0, hidden_N.shape[0], LOGIT_CHUNK):
        h, t = hidden_N[start: start + LOGIT_CHUNK], targets_N[start: start + LOGIT_CHUNK]
        if not torch.is_grad_enabled():
            out.append(chunk_token_logprobs(h, weight, bias, t, head, inv_temperature, top_k, top_p))
        elif not weight.requires_grad:
            out.append(FrozenHeadLogprobs.apply(h, weight, bias, t, head, inv_temperature, top_k, top_p))
        else:
            out.append(checkpoint(chunk_token_logprobs, h, weight, bias, t, head, inv_temperature, top_k, top_p,
                                  use_reentrant=False))
    return torch.cat(out)
