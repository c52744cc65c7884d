"""The learner's fast paths equal the plain computation: one prompt forward per GRPO group (rl_lora/learner/prefix.py) and
the frozen output layer's logprob gradient computed in forward (logprobs.FrozenHeadLogprobs)."""

import random

import pytest
import torch
from sample_builders import build_learner, perturb_B

from rl_lora.config import ALL_LINEAR, AdapterSpec
from rl_lora.learner import batching, heads
from rl_lora.learner.learner import Learner, TrainSample
from rl_lora.learner.logprobs import FrozenHeadLogprobs, chunk_token_logprobs

SPECS = [AdapterSpec(name=f"a{k}", rank=1, alpha=32, target_modules=list(ALL_LINEAR), lr=1e-2, seed=k)
         for k in range(2)]


def grpo_samples(seed=0, adapters=2, groups=3, group_size=4) -> list[TrainSample]:
    """Groups of completions sharing a prompt, uneven lengths (completions of 1 token included), shuffled."""
    from sample_builders import random_samples

    return random_samples(seed, adapters=adapters, groups=groups, group_size=group_size, shuffle=True)


def _learner(tiny_model, **kw) -> Learner:
    learner = build_learner(tiny_model, *SPECS, temperature=0.7, **kw)
    perturb_B(learner, 1, scale=0.05)
    return learner


def _logprobs_and_grads(learner, samples):
    logprobs = torch.tensor([x for row in learner.score(samples) for x in row])
    learner.backward(samples)
    return logprobs, torch.cat([p.grad.flatten() for p in learner.params])


@pytest.mark.parametrize("checkpointing,budget", [(False, 4096), (True, 4096), (False, 40), (True, 30)])
def test_shared_prompt_forward_equals_one_forward_per_sequence(tiny_model, checkpointing, budget):
    """Same logprobs and gradients, K=2 adapters, with and without activation checkpointing; budgets of 30-40
    tokens split groups over micro-batches."""
    samples = grpo_samples()
    ref_lp, ref_g = _logprobs_and_grads(_learner(tiny_model, share_prompts=False), samples)
    learner = _learner(tiny_model, share_prompts=True, activation_checkpointing=checkpointing,
                       tokens_per_microbatch=budget)
    assert learner.share_prompts
    lp, g = _logprobs_and_grads(learner, samples)
    assert ref_g.abs().max() > 0
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-4 * ref_g.abs().max().item())


def test_shared_prompt_runs_each_prompt_once(tiny_model):
    samples = grpo_samples(groups=2, group_size=4)
    counts = []
    for share in (False, True):
        learner = _learner(tiny_model, share_prompts=share)
        seen = []
        learner.model.get_input_embeddings().register_forward_hook(
            lambda m, args, out: seen.append(int(args[0].numel())))
        learner.score(samples)
        counts.append(sum(seen))
    unshared, shared = counts
    distinct = {(s.adapter, tuple(s.prompt_ids)) for s in samples}
    assert unshared >= sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    # padded: every prompt once, plus completions minus their last token
    longest_p = max(len(p) for _, p in distinct)
    longest_c = max(len(s.completion_ids) for s in samples) - 1
    assert shared <= len(distinct) * longest_p + len(samples) * longest_c
    assert shared < 0.8 * unshared


def _cost(mb, kv_weight):
    """Padded prompts + padded completions through the model + each completion's gathered copy of its prompt."""
    prompts = {(s.adapter, tuple(s.prompt_ids)) for s in mb}
    width_p = max(len(p) for _, p in prompts)
    return len(prompts) * width_p + len(mb) * max(len(s.completion_ids) for s in mb) + kv_weight * len(mb) * width_p


def test_microbatches_keep_groups_and_the_budget(tiny_model):
    samples = grpo_samples(groups=4, group_size=4)
    learner = _learner(tiny_model, tokens_per_microbatch=60)
    batches = learner._microbatches(samples)
    assert sorted(map(id, samples)) == sorted(id(s) for mb in batches for s in mb)
    for mb in batches:
        assert _cost(mb, learner.kv_weight) <= 60 or len(mb) == 1
        assert [s.adapter for s in mb] == sorted(s.adapter for s in mb)


def test_budget_counts_each_completions_copy_of_the_prompt_keys_values(tiny_model):
    """Long prompts, short completions: the gathered prompt keys/values (one copy per completion, kept for
    attention's backward) dominate, and must be counted (uncounted, this step packed into one micro-batch)."""
    rng = random.Random(0)
    samples = []
    for _ in range(2):
        prompt = [rng.randrange(3, 200) for _ in range(150)]
        samples += [TrainSample(prompt, [rng.randrange(3, 200) for _ in range(4)], [-5.0] * 4, 1.0)
                    for _ in range(8)]
    learner = build_learner(tiny_model, tokens_per_microbatch=500)
    weight = learner.kv_weight
    config = learner.model.config  # 2 x the repeated keys/values (q_dim) over ~7 d + 2 kv_dim + 2 d_ff per token
    assert weight == pytest.approx(2 * 128 / (7 * 128 + 2 * 64 + 2 * config.intermediate_size))
    batches = learner._microbatches(samples)
    assert len(batches) > 1
    assert all(_cost(mb, weight) <= 500 for mb in batches)
    assert sorted(map(id, samples)) == sorted(id(s) for mb in batches for s in mb)


@pytest.mark.parametrize("head,with_bias", [(heads.Head(), False), (heads.Head(scale=0.125), False),
                                            (heads.Head(softcap=2.0), False), (heads.Head(4.0, 3.0), True)])
def test_frozen_head_logprob_gradient_equals_autograd(head, with_bias):
    """Plain, scaled (Granite/Cohere), soft-capped (Gemma-2: the cap changes the gradient) and biased (Phi) heads."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen)
    bias = torch.randn(50, generator=gen) if with_bias else None
    targets = torch.randint(0, 50, (37,), generator=gen)
    upstream = torch.randn(37, generator=gen)
    ours = FrozenHeadLogprobs.apply(hidden, weight, bias, targets, head, 1 / 0.7)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    z = hidden @ weight.T + (0 if bias is None else bias)
    z = z * head.scale
    z = head.softcap * torch.tanh(z / head.softcap) if head.softcap else z
    plain = torch.log_softmax(z / 0.7, -1).gather(-1, targets[:, None]).squeeze(-1)
    (g_plain,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(g_ours, g_plain)
    torch.testing.assert_close(chunk_token_logprobs(hidden, weight, bias, targets, head, 1 / 0.7), plain)


def test_data_parallel_shards_deal_whole_groups():
    samples = grpo_samples(groups=3, group_size=4)  # 6 groups
    shards = [batching.shard(samples, r, 2) for r in range(2)]
    assert sorted(map(id, samples)) == sorted(id(s) for sh in shards for s in sh)
    keys = [{(s.adapter, tuple(s.prompt_ids)) for s in sh} for sh in shards]
    assert not keys[0] & keys[1]
    tokens = [sum(len(s.prompt_ids) + len(s.completion_ids) for s in sh) for sh in shards]
    assert max(tokens) < 0.7 * sum(tokens)
    # fewer groups than ranks: dealt by sample, nobody idle
    few = grpo_samples(adapters=1, groups=1, group_size=4)
    assert all(batching.shard(few, r, 4) for r in range(4))


@pytest.mark.parametrize("targets", [ALL_LINEAR, ALL_LINEAR[:4]])
def test_fused_swiglu_equals_autograd(tiny_model, targets):
    """The MLP that recomputes its intermediates gives the same logprobs and adapter gradients, with the down
    projection adapted (K=1 and a K=2 mixed batch, which takes the routed path) or not (attention-only)."""
    samples = grpo_samples()
    specs = [AdapterSpec(name=f"a{k}", rank=1, alpha=32, target_modules=list(targets), lr=1e-2, seed=k)
             for k in range(2)]
    for chosen in (specs[:1], specs):
        picked = [s for s in samples if s.adapter < len(chosen)]
        results = []
        for fuse in (False, True):
            learner = build_learner(tiny_model, *chosen, temperature=0.7, fuse_mlp=fuse, tokens_per_microbatch=64)
            mlps = [m for m in learner.model.modules() if hasattr(m, "gate_proj")]
            assert mlps and all(("forward" in vars(m)) == fuse for m in mlps)  # the fused forward is in place
            perturb_B(learner, 1, scale=0.05)
            results.append(_logprobs_and_grads(learner, picked))
        (lp0, g0), (lp1, g1) = results
        torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5 * g0.abs().max().item())
