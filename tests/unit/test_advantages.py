"""Advantages when reward calls fail: a failed completion is left out of its group's baseline and of the loss,
never trained as a genuine 0 (no model loads)."""

import math

import pytest
import torch

from rl_lora.advantages import valid_group_advantages
from rl_lora.loop import Scored, assign_advantages, make_samples
from rl_lora.rollout import Completion, Group


def _group(rewards, failed, i=0):
    completions = [Completion([5 + j, 6], [-1.0, -1.0], "x", "stop", 1) for j in range(len(rewards))]
    return Group(i, "q", [1, 2, 3], completions), list(rewards), list(failed)


def _advantages(groups, scale_by_std):
    scored = Scored([r for _, rs, _ in groups for r in rs], [], 0, 0, 0, [f for _, _, fs in groups for f in fs])
    return assign_advantages([g for g, _, _ in groups], scored, scale_by_std)


def test_failed_completion_is_out_of_the_baseline_and_the_loss():
    g = _group([1.0, 0.0, 0.0, 1.0], [False, True, False, False])
    kept, dropped = _advantages([g], scale_by_std=False)
    assert [k for k, _ in kept] == [g[0]] and dropped == 0
    advantages_G = kept[0][1]
    # the baseline is the mean of the 3 scored rewards (2/3), not of 4 with a made-up 0 (0.5)
    assert advantages_G[1] is None
    assert advantages_G[0] == pytest.approx(1 / 3) and advantages_G[2] == pytest.approx(-2 / 3)
    samples = make_samples(kept)
    assert [s.completion_ids[0] for s in samples] == [5, 7, 8]  # completion 1 is not trained on
    assert [s.advantage for s in samples] == pytest.approx([1 / 3, -2 / 3, 1 / 3])


def test_group_with_fewer_than_two_scored_completions_is_dropped_and_counted():
    few = _group([0.0, 1.0, 0.0, 0.0], [True, False, True, True], 0)
    none = _group([0.0, 0.0], [True, True], 1)
    flat = _group([1.0, 0.0, 1.0], [False, True, False], 2)  # scored ones agree: no signal, not a failure drop
    ok = _group([1.0, 0.0], [False, False], 3)
    kept, dropped = _advantages([few, none, flat, ok], scale_by_std=True)
    assert [g for g, _ in kept] == [ok[0]] and dropped == 2
    assert kept[0][1] == pytest.approx([1.0, -1.0], abs=1e-5)


def test_valid_group_advantages_marks_the_others_nan():
    a = valid_group_advantages(torch.tensor([3.0, 0.0, 1.0]), torch.tensor([True, False, True]))
    assert a[0].item() == 1.0 and math.isnan(a[1].item()) and a[2].item() == -1.0
    assert valid_group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([True, False])) is None
