"""The learner replays the sampler's top-k / top-p truncation (rl_lora/truncation.py): its logprobs and their
gradient equal a log-softmax over the set that vLLM 0.32's own masking function keeps (the sampled token always
kept), on the tiny model. The end-to-end check (rho = 1 on-policy through the real sampler) is in test_train.py."""


import pytest
import torch
from sample_builders import build_full_learner, build_learner, random_samples

from rl_lora.learner.learner import Learner, TrainSample


def _samples(seed: int, n: int = 4) -> list[TrainSample]:
    return random_samples(seed, groups=n, vocab=(3, 250), prompt_len=(4, 10), completion_len=(3, 8), logprob=-5.0,
                          advantages=(-1.0, 1.0))


def _reference_logprobs(learner: Learner, samples, temperature, top_k, top_p) -> torch.Tensor:
    """Plain autograd: the model's full forward, logits / T masked by vLLM's apply_top_k_top_p_pytorch (the
    sampled token kept), log-softmax, gathered."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        learner._route([0])
        logits = learner.model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1].float() / temperature
        n = logits.shape[0]
        k = torch.full((n,), top_k, dtype=torch.long) if top_k > 0 else None
        p = torch.full((n,), top_p) if top_p < 1 else None
        masked = apply_top_k_top_p_pytorch(logits.detach().clone(), k, p, allow_cpu_sync=True)
        drop = torch.isinf(masked)
        targets = torch.tensor(s.completion_ids)
        drop[torch.arange(n), targets] = False
        logp = logits.masked_fill(drop, float("-inf")).log_softmax(-1)
        out.append(logp[torch.arange(n), targets])
    return torch.cat(out)


@pytest.mark.parametrize("top_k,top_p", [(-1, 0.8), (20, 1.0), (50, 0.7)])
def test_truncated_logprobs_and_gradient_equal_vllms_masked_softmax(tiny_model, top_k, top_p):
    learner = build_learner(tiny_model, temperature=0.7, top_k=top_k, top_p=top_p)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in learner.adapters.values():
            v.lora_B.copy_(torch.randn(v.lora_B.shape, generator=gen) * 0.05)
    samples = _samples(1)
    weights = torch.randn(sum(len(s.completion_ids) for s in samples), generator=gen)

    got = learner.token_logprobs(samples)  # the frozen-head path (gradient computed in forward)
    (got * weights).sum().backward()
    got_grads = [v.lora_B.grad.clone() for v in learner.adapters.values()]
    learner.optimizer.zero_grad(set_to_none=True)
    want = _reference_logprobs(learner, samples, 0.7, top_k, top_p)
    (want * weights).sum().backward()
    want_grads = [v.lora_B.grad.clone() for v in learner.adapters.values()]

    torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-5)
    for g, w in zip(got_grads, want_grads):  # fp32 summation order differs: 1e-4 of the tensor's largest entry
        assert w.abs().max() > 0 and (g - w).abs().max() <= 1e-4 * w.abs().max()
    # the truncation does something here: the full softmax gives clearly higher-entropy logprobs
    full = build_learner(tiny_model, temperature=0.7)
    with torch.no_grad():
        for name, v in full.adapters.items():
            v.lora_B.copy_(learner.adapters[name].lora_B)
    assert (learner.score(samples)[0][0] - full.score(samples)[0][0]) > 0.05


def test_full_finetune_path_truncates_the_same(tiny_model):
    """Full fine-tuning scores through the recomputed-logits path (the output layer trains): the same values as
    the frozen-head path and the no-grad path."""
    samples = _samples(2)
    lora = build_learner(tiny_model, temperature=0.7, top_k=50, top_p=0.7)  # B = 0: the base
    full = build_full_learner(tiny_model, temperature=0.7, top_k=50, top_p=0.7)
    want = _reference_logprobs(lora, samples, 0.7, 50, 0.7).detach()
    torch.testing.assert_close(full.token_logprobs(samples).detach(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor([x for lp in lora.score(samples) for x in lp]), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(-1, 0.9), (-1, 0.3), (1000, 0.95), (5, 1.0), (-1, 1e-3)])
def test_kept_set_equals_vllms_on_a_large_vocabulary(top_k, top_p):
    """rl_lora.truncation's kept set against vLLM 0.32's own masking, on peaked and flat rows of a 32k vocabulary;
    targets sampled from vLLM's truncated distribution (so the always-kept target changes nothing)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from rl_lora.truncation import dropped_mask

    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 1.0, 3.0, 8.0]).repeat(4)[:, None]
    logits = torch.randn(16, 32000, generator=gen) * scale
    n = logits.shape[0]
    k = torch.full((n,), top_k, dtype=torch.long) if top_k > 0 else None
    p = torch.full((n,), top_p) if top_p < 1 else None
    masked = apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=True)
    targets = torch.multinomial(masked.softmax(-1), 1, generator=gen)[:, 0]
    got = dropped_mask(logits, targets, top_k, top_p)
    assert torch.equal(got, torch.isinf(masked))
    assert got.any() and (~got).sum() > n  # something dropped, and more than one token kept somewhere
