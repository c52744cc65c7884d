"""The paper's LR rule, the capacity check and `lr: auto` (rl_lora/science.py)."""

import pytest

from rl_lora.config import ALL_LINEAR, load_config
from rl_lora.science import ModelShape, adapter_parameters, capacity_check, read_shape, suggest_lr


def _shape(model_type="llama", hidden=576):
    return ModelShape(model_type, hidden, 1536, 30, 9, 3, 64)


def test_fitted_rule_llama_and_qwen():
    s = suggest_lr(_shape("llama", 576))
    assert s.lora_lr == pytest.approx(9.8 * 5e-5 * (2000 / 576) ** 0.781)
    assert s.multiplier == pytest.approx(9.8)
    q = suggest_lr(_shape("qwen3", 4096))
    assert q.lora_lr == pytest.approx(9.8 * 5e-5 * (2000 / 4096) ** 0.0775)
    assert suggest_lr(_shape("llama", 576), steps=50).lora_lr == pytest.approx(1.5 * s.lora_lr)  # short run


def test_from_a_known_full_finetuning_lr():
    assert suggest_lr(_shape(), fullft_lr=2e-5, steps=1000).lora_lr == pytest.approx(2e-4)
    assert suggest_lr(_shape(), fullft_lr=2e-5, steps=50).lora_lr == pytest.approx(3e-4)
    with pytest.raises(ValueError):
        suggest_lr(_shape(), fullft_lr=0.0)


def test_unknown_family_says_so():
    assert "no fitted exponent" in suggest_lr(_shape("gpt2")).how


def test_adapter_parameter_count_matches_the_learner(tiny_model):
    from sample_builders import build_learner

    shape = read_shape(tiny_model)
    learner = build_learner(tiny_model)
    assert adapter_parameters(shape, 1, ALL_LINEAR) == learner.num_trainable()
    assert adapter_parameters(shape, 2, ["q_proj"]) == 2 * (128 + 128) * shape.num_layers


def test_capacity_warning():
    ok = capacity_check(_shape(), 1, ALL_LINEAR, episodes=10_000)
    assert ok.ok and "WARNING" not in ok.message()
    small = capacity_check(_shape(), 1, ["q_proj"], episodes=10**7)
    assert not small.ok and "WARNING" in small.message()


def test_lr_auto_is_a_valid_config_value():
    assert load_config(None, ["optim.lr=auto"]).optim.lr == "auto"
