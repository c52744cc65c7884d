"""The learner's pure pieces without a model: micro-batch packing, prompt groups, adapter runs and routing, the
data-parallel shards, and the loss chosen once from the config."""

import random
from types import SimpleNamespace

import pytest
import torch
from sample_builders import random_samples

from rl_lora import loss
from rl_lora.config import LossConfig
from rl_lora.learner import batching
from rl_lora.rollout import TrainSample


def _samples(groups_per_adapter=3):
    """Two adapters' groups of 4, alternating (0, 1, 0, 1, ...): the packer must sort them into adapter runs."""
    return random_samples(0, groups=groups_per_adapter, group_size=4, adapters=2, prompt_len=(3, 20),
                          completion_len=(1, 30), logprob=-1.0, advantages=(1.0,), interleave=True)


def _shared_cost(mb, kv):
    units = {(s.adapter, tuple(s.prompt_ids)) for s in mb}
    return batching.shared_cost(len(units), max(len(p) for _, p in units), len(mb),
                                max(len(s.completion_ids) for s in mb), kv)


@pytest.mark.parametrize("budget", [40, 120, 10_000])
def test_unshared_packing_keeps_every_sample_within_the_budget(budget):
    samples = _samples()
    batches = batching.pack_microbatches(samples, budget)
    assert sorted(map(id, samples)) == sorted(id(s) for mb in batches for s in mb)
    for mb in batches:
        padded = max(len(s.prompt_ids) + len(s.completion_ids) for s in mb) * len(mb)
        assert padded <= budget or len(mb) == 1
        assert [s.adapter for s in mb] == sorted(s.adapter for s in mb)
    if budget == 10_000:
        assert len(batches) == 1


@pytest.mark.parametrize("budget,kv", [(60, 0.2), (200, 0.0), (200, 0.5)])
def test_shared_packing_costs_the_prompt_once_and_its_kv_copies(budget, kv):
    samples = _samples()
    batches = batching.pack_microbatches(samples, budget, kv_weight=kv)
    assert sorted(map(id, samples)) == sorted(id(s) for mb in batches for s in mb)
    for mb in batches:
        assert _shared_cost(mb, kv) <= budget or len(mb) == 1
        assert [s.adapter for s in mb] == sorted(s.adapter for s in mb)


def test_shared_packing_fits_more_than_unshared_and_keeps_small_groups_whole():
    rng = random.Random(1)
    samples = []
    for _ in range(4):  # long prompts, short completions: what prompt sharing is for
        prompt = [rng.randrange(3, 200) for _ in range(50)]
        for n in (rng.randrange(1, 10) for _ in range(8)):
            samples.append(TrainSample(prompt, [7] * n, [-1.0] * n, 1.0))
    shared = batching.pack_microbatches(samples, 400, kv_weight=0.0)
    unshared = batching.pack_microbatches(samples, 400)
    assert len(shared) < len(unshared)
    # a group that fits the budget stays in one micro-batch (its prompt is run once)
    where = {}
    for b, mb in enumerate(shared):
        for s in mb:
            where.setdefault(tuple(s.prompt_ids), set()).add(b)
    assert all(len(b) == 1 for b in where.values())


def test_group_keys_and_routing_segments():
    a, b = [1, 2], [3]
    samples = [TrainSample(a, [5], [0.0], 1.0, 0), TrainSample(b, [5], [0.0], 1.0, 0),
               TrainSample(a, [6], [0.0], 1.0, 0), TrainSample(a, [5], [0.0], 1.0, 1)]
    assert batching.group_keys(samples) == ([(0, (1, 2)), (0, (3,)), (1, (1, 2))], [0, 1, 0, 2])
    assert batching.route_segments([0, 0, 1, 1, 1, 0]) == [(0, 0, 2), (1, 2, 5), (0, 5, 6)]
    runs = batching.adapter_runs(samples)
    assert [(k, len(r)) for k, r in runs] == [(0, 3), (1, 1)]
    assert batching.tokens_per_adapter(samples, 3) == [3, 1, 0]


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shards_partition_the_step_and_keep_groups_whole(size):
    samples = _samples()
    shards = [batching.shard(samples, r, size) for r in range(size)]
    assert sorted(id(s) for sh in shards for s in sh) == sorted(map(id, samples))
    for sh in shards:  # step order kept
        assert [samples.index(s) for s in sh] == sorted(samples.index(s) for s in sh)
    if size <= 6:
        owner = {}
        for r, sh in enumerate(shards):
            for s in sh:
                assert owner.setdefault((s.adapter, tuple(s.prompt_ids)), r) == r


def _inputs():
    gen = torch.Generator().manual_seed(0)
    logp_s = -torch.rand(12, generator=gen) * 3
    logp_l = (logp_s + torch.randn(12, generator=gen) * 0.5).requires_grad_()
    adv = torch.randn(12, generator=gen)
    return loss.LossInputs(logp_l, logp_s, adv, num_tokens=12)


def test_the_loss_is_chosen_once_from_the_config():
    inp = _inputs()
    assert loss.loss_name(LossConfig()) == "truncated_is"
    assert loss.loss_name(LossConfig(ppo_clip=0.2)) == "ppo_clip"
    torch.testing.assert_close(loss.build_loss(LossConfig(is_cap=1.5))(inp).loss,
                               loss.truncated_is_loss(inp, is_cap=1.5).loss)
    torch.testing.assert_close(loss.build_loss(LossConfig(ppo_clip=0.2, is_cap=3.0))(inp).loss,
                               loss.ppo_clip_loss(inp, eps=0.2, is_cap=3.0).loss)
    assert not torch.equal(loss.build_loss(LossConfig(ppo_clip=0.2))(inp).loss,
                           loss.build_loss(LossConfig())(inp).loss)


def test_a_new_loss_is_one_function_and_one_registration(monkeypatch):
    monkeypatch.setattr(loss, "LOSSES", dict(loss.LOSSES))

    def reinforce(inp):
        return loss.LossOutputs(-(inp.logp_learner_T * inp.advantages_T).sum() / inp.num_tokens, {})

    loss.LOSSES = {"reinforce": (lambda c: getattr(c, "reinforce", False), lambda c: reinforce), **loss.LOSSES}
    assert loss.build_loss(SimpleNamespace(reinforce=True, ppo_clip=0.0, is_cap=2.0)) is reinforce
    assert loss.loss_name(LossConfig()) == "truncated_is"
