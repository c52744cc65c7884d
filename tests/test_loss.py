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


def test_ppo_clip_stops_gradient_outside_trust_region():
    logp_l, inp = _inputs([0.0, 0.0], [-1.0, 0.0], [1.0, 1.0])
    out = ppo_clip_loss(inp, eps=0.2)
    out.loss.backward()
    assert logp_l.grad[0].item() == 0.0  # rho = 2.7 > 1.2 with A > 0: clipped
    assert logp_l.grad[1].item() == pytest.approx(-0.5)


def test_kl_estimate_is_positive_off_policy():
    _, inp = _inputs([-1.0, -1.2], [-1.1, -0.9], [0.0, 0.0])
    assert truncated_is_loss(inp, 10.0).metrics["is/kl_sum"] > 0


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(group_advantages(r), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(group_advantages(r, scale_by_std=True), torch.tensor([1.0, -1.0, -1.0, 1.0]),
                               atol=1e-5, rtol=0)
    assert has_signal(r) and not has_signal(torch.ones(4))
