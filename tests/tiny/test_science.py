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


def _grid_result(family, model_type):
    from rl_lora.grid_summary import summarise

    cells = [{"variant": v, "lr": lr, "seed": s, "accuracy": acc + 0.01 * s, "accuracy_given_answer": None}
             for v, lr, acc in (("r1", 1e-3, 0.3), ("r1", 1e-2, 0.6), ("full", 1e-4, 0.5), ("full", 1e-3, 0.2))
             for s in range(3)]
    return summarise(cells, None, {"model": "m", "family": family, "model_type": model_type, "hidden_size": 576,
                                   "data": "arithmetic", "steps": 8, "seeds": [0, 1, 2], "full_variants": ["full"]})


def test_lr_suggest_prints_what_committed_grids_measured_for_the_family(tmp_path, tiny_model, capsys, monkeypatch):
    import json

    from rl_lora import cli, science

    for name, family, model_type in (("a_rank", "llama", "llama"), ("other", "qwen", "qwen3")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_grid_result(family, model_type)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{")
    lines = science.measured_lrs(_shape("llama"), tmp_path)
    assert len(lines) == 1 and lines[0].startswith("a_rank/ (m, hidden 576, arithmetic, 8 steps, 3 seeds)")
    assert "r1 0.01 (0.61 [" in lines[0] and "full 0.0001" in lines[0] and "r1/full FT 100x" in lines[0]
    assert science.measured_lrs(_shape("gpt2"), tmp_path) == []
    monkeypatch.setattr(science, "EXPERIMENTS", tmp_path)
    assert cli.main(["lr-suggest", "--model", tiny_model]) == 0
    out = capsys.readouterr().out
    assert "measured      a_rank/" in out and "qwen" not in out
    monkeypatch.setattr(science, "EXPERIMENTS", tmp_path / "none")
    assert cli.main(["lr-suggest", "--model", tiny_model]) == 0
    assert "no committed grid for this model family yet" in capsys.readouterr().out
