import math

import pytest
import torch

from rl_lora.advantages import group_advantages, has_signal
from rl_lora.loss import LossInputs, ppo_clip_loss, truncated_is_loss


def _inputs(logp_l, logp_s, adv):
    logp_l = torch.tensor(logp_l, requires_grad=True)
    return logp_l, LossInputs(logp_l, torch.tensor(logp_s), torch.tensor(adv), num_tokens=len(adv))


def test_on_policy_ratio_is_one_and_gradient_is_reinforce():
    logp_l, inp = _inputs([-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5], [1.0, 1.0, -2.0])
    out = truncated_is_loss(inp, is_cap=2.0)
    out.loss.backward()
    assert out.metrics["is/ratio_sum"] == pytest.approx(3.0)
    assert out.metrics["is/kl_sum"] == pytest.approx(0.0, abs=1e-7)
    # d/dlogp of -(rho*A)/N at rho=1 is -A/N
    torch.testing.assert_close(logp_l.grad, torch.tensor([-1.0, -1.0, 2.0]) / 3)


def test_truncation_caps_value_and_gradient_weight():
    # rho = e^1 ~ 2.72 > cap 2
    logp_l, inp = _inputs([0.0], [-1.0], [1.0])
    out = truncated_is_loss(inp, is_cap=2.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-2.0)
    assert logp_l.grad.item() == pytest.approx(-2.0)
    assert out.metrics["is/limited_sum"] == 1.0


def test_extreme_log_ratios_weigh_zero_or_the_cap_never_nan():
    """log rho = -200 underflows rho to 0 and +200 overflows it in fp32; each token must then weigh exactly 0 or
    the cap (value and gradient), next to an ordinary token whose gradient is untouched. (Before log-space
    ratios: 0/0 and inf*0 made the whole step NaN, and the learner skipped it.)"""
    logp_l, inp = _inputs([-201.0, -1.0, -0.5], [-1.0, -201.0, -0.5], [1.0, 1.0, -1.0])
    out = truncated_is_loss(inp, is_cap=2.0)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and out.loss.item() == pytest.approx((-0.0 - 2.0 + 1.0) / 3)
    torch.testing.assert_close(logp_l.grad, torch.tensor([0.0, -2.0, 1.0]) / 3)
    assert out.metrics["is/limited_sum"] == 1.0
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_learner_logprob_of_minus_inf_weighs_zero():
    """A token the learner gives probability 0 (log p = -inf) has rho = 0: no value, no gradient, no NaN."""
    logp_l, inp = _inputs([float("-inf"), -1.0], [-2.0, -1.0], [1.0, 1.0])
    out = truncated_is_loss(inp, is_cap=2.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.5)
    torch.testing.assert_close(logp_l.grad, torch.tensor([0.0, -0.5]))


def test_nan_logprobs_still_make_the_step_non_finite():
    _, inp = _inputs([float("nan"), -1.0], [-1.0, -1.0], [1.0, 1.0])
    assert math.isnan(truncated_is_loss(inp, 2.0).loss.item())
    assert math.isnan(ppo_clip_loss(inp, 0.2, 2.0).loss.item())


# PPO: per token L = max(-rho A, -clip(rho, 1-eps, 1+eps) A), and with the dual clip c: min(L, c |A|) for A < 0.
# Gradient d L / d logp = -A rho where the unclipped term is active, else 0.
PPO_CASES = [  # (log rho, A, expected loss value, expected dL/dlogp) with eps = 0.2, c = 2
    (1.0, 1.0, -1.2, 0.0),  # A > 0, rho = 2.72 > 1.2: clipped
    (0.0, 1.0, -1.0, -1.0),  # A > 0, rho = 1: unclipped
    (-1.0, 1.0, -math.exp(-1), -math.exp(-1)),  # A > 0, rho = 0.37 < 0.8: unclipped (pessimistic), gradient flows
    (-1.0, -1.0, 0.8, 0.0),  # A < 0, rho = 0.37 < 0.8: clipped
    (0.0, -1.0, 1.0, 1.0),  # A < 0, rho = 1: unclipped
    (0.5, -1.0, math.exp(0.5), math.exp(0.5)),  # A < 0, rho = 1.65 in (1.2, c): unclipped, gradient grows with rho
    (1.0, -1.0, 2.0, 0.0),  # A < 0, rho = 2.72 > c = 2: dual clip, value c |A|, no gradient
    (200.0, -0.5, 1.0, 0.0),  # A < 0, rho overflows fp32: dual clip, finite
    (200.0, 0.5, -0.6, 0.0),  # A > 0, rho overflows fp32: clipped, finite
    (-200.0, -0.5, 0.4, 0.0),  # A < 0, rho underflows to 0: clipped
    (-200.0, 0.5, 0.0, 0.0),  # A > 0, rho underflows to 0: unclipped, weight 0
]


@pytest.mark.parametrize("log_ratio,adv,value,grad", PPO_CASES)
def test_ppo_branches_exact_value_and_gradient(log_ratio, adv, value, grad):
    logp_l, inp = _inputs([log_ratio - 3.0], [-3.0], [adv])
    out = ppo_clip_loss(inp, eps=0.2, is_cap=2.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(value, rel=1e-6, abs=1e-7)
    assert logp_l.grad.item() == pytest.approx(grad, rel=1e-6, abs=1e-7)
    assert out.metrics["is/limited_sum"] == (1.0 if grad == 0.0 and not (log_ratio < -100 and adv > 0) else 0.0)


def test_ppo_without_dual_clip_keeps_the_unbounded_negative_term():
    logp_l, inp = _inputs([1.0], [0.0], [-1.0])  # rho = e
    out = ppo_clip_loss(inp, eps=0.2)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(math.e) and logp_l.grad.item() == pytest.approx(math.e)


def test_ppo_batch_normalises_by_step_tokens():
    logp_l, inp = _inputs([-3.0, -3.0], [-4.0, -3.0], [1.0, -1.0])  # rho = e (clipped, A > 0), rho = 1 (A < 0)
    inp.num_tokens = 4
    out = ppo_clip_loss(inp, eps=0.2, is_cap=2.0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx((-1.2 + 1.0) / 4)
    torch.testing.assert_close(logp_l.grad, torch.tensor([0.0, 0.25]))


def test_kl_estimate_is_the_k3_value():
    # log rho = 0.1 and -0.3: k3 = sum(rho - 1 - log rho) = (e^0.1 - 1.1) + (e^-0.3 - 0.7)
    _, inp = _inputs([-1.0, -1.2], [-1.1, -0.9], [0.0, 0.0])
    expected = (math.exp(0.1) - 1.1) + (math.exp(-0.3) - 0.7)
    for out in (truncated_is_loss(inp, 10.0), ppo_clip_loss(inp, 0.2, 2.0)):
        assert out.metrics["is/kl_sum"] == pytest.approx(expected, rel=1e-5)
        assert out.metrics["is/ratio_sum"] == pytest.approx(math.exp(0.1) + math.exp(-0.3), rel=1e-6)
        assert out.metrics["is/ratio_max"] == pytest.approx(math.exp(0.1), rel=1e-6)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(group_advantages(r), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(group_advantages(r, scale_by_std=True), torch.tensor([1.0, -1.0, -1.0, 1.0]),
                               atol=1e-5, rtol=0)
    assert has_signal(r) and not has_signal(torch.ones(4))
