"""Bad input refused before any model loads or engine starts (one line, exit 2), and the GPU memory plan.

Every train test here replaces the engine and the learner with stubs that fail the test if reached: the refusal
must come first."""

import pytest

import rl_lora.train
from rl_lora.cli import main


@pytest.fixture
def no_model(monkeypatch):
    """Starting an engine or building the learner fails the test."""
    def reached(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(rl_lora.train, "build_fleet", reached)
    monkeypatch.setattr(rl_lora.train, "make_policy", reached)


def _refused(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("name, needle", [
    ("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
    ("os:sep", "not callable"),
    ("os.path:no_such_function", "has no attribute"),
    ("os.path:basename", "must take (prompt, completion"),  # one positional argument
])
def test_bad_reward_is_one_line_before_any_model(make_config, no_model, capsys, tmp_path, name, needle):
    cfg = make_config(reward={"rewards": [{"name": name}]})
    _refused(capsys, ["train", str(cfg)], "reward.rewards[0]", needle)
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_adapter_reward_names_the_adapter(make_config, no_model, capsys):
    cfg = make_config(adapters=[{"name": "a", "lr": 1e-3}, {"name": "b", "lr": 1e-3,
                                                           "rewards": [{"name": "no_such_pkg:fn"}]}],
                      sampler={"samples_per_prompt": 4, "max_tokens": 4, "max_loras": 3})
    _refused(capsys, ["train", str(cfg)], "adapters[1].rewards[0]", "no_such_pkg")


def test_target_module_typo_is_one_line_before_the_engine(make_config, no_model, capsys):
    cfg = make_config(lora={"target_modules": ["q_proj", "qq_proj"]})
    _refused(capsys, ["train", str(cfg)], "lora.target_modules", "qq_proj", "model_type 'llama' has:", "o_proj")


def test_target_module_of_another_family_is_refused(make_config, no_model, capsys):
    cfg = make_config(lora={"target_modules": ["c_attn"]})  # GPT-2's name, not Llama's
    _refused(capsys, ["train", str(cfg)], "lora.target_modules", "c_attn")


def test_tensor_parallel_that_does_not_divide_the_heads(make_config, no_model, capsys):
    cfg = make_config(sampler={"samples_per_prompt": 4, "max_tokens": 4, "tensor_parallel_size": 3})
    _refused(capsys, ["train", str(cfg)], "sampler.tensor_parallel_size", "2 attention heads")


def test_lora_rank_above_what_vllm_serves(make_config, no_model, capsys):
    cfg = make_config(lora={"rank": 1024})
    _refused(capsys, ["train", str(cfg)], "lora.rank", "512")


def test_max_model_len_above_the_models_context(make_config, no_model, capsys):
    cfg = make_config(model={"max_model_len": 4096})  # the tiny model has 1024 positions
    _refused(capsys, ["train", str(cfg)], "model.max_model_len", "1024")


# ----------------------------------------------------------------------------------------------------------
# GPU memory plan


def test_transformers_backend_model_with_an_in_process_engine(tmp_path, no_model, capsys, monkeypatch):
    """Phi-1/2 is served by vLLM's Transformers backend, which patches transformers' PhiModel in its process: with the
    engine in-process the learner's model build died with an AssertionError traceback after the engine started."""
    import tiny_models
    from runhelpers import write_config

    model = tiny_models.phi(tmp_path / "phi")
    capsys.readouterr()  # the model build's progress bar
    targets = {"target_modules": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]}
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = write_config(tmp_path, str(model), lora=targets)
    _refused(capsys, ["train", str(cfg)], "PhiForCausalLM", "Transformers backend", "VLLM_ENABLE_V1_MULTIPROCESSING=1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine in its own process: no refusal
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["train", str(write_config(tmp_path, str(model), lora=targets,
                                        train={"output_dir": str(tmp_path / "run-mp")}))])


def test_plan_counts_the_models_own_parameters():
    """plan's parameter count equals the HF model's, built from the real 8B configs on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from rl_lora.plan import KNOWN_CONFIGS, base_parameters, shape_of

    for name, cls in (("Qwen/Qwen3-8B", Qwen3Config), ("meta-llama/Llama-3.1-8B-Instruct", LlamaConfig)):
        raw = KNOWN_CONFIGS[name]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cls(**{k: v for k, v in raw.items() if k != "model_type"}))
        assert base_parameters(shape_of(raw), raw["vocab_size"], False) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("recipe", ["configs/qwen3_8b_deepmath.yaml", "configs/llama31_8b_gsm8k.yaml",
                                    "configs/llama31_8b_math.yaml"])
def test_shipped_8b_recipes_fit_one_80gb_gpu(capsys, recipe):
    assert main(["plan", recipe]) == 0
    out = capsys.readouterr().out
    assert "fits:" in out and "activations" in out and "engine share" in out


def test_plan_refuses_an_8b_recipe_without_checkpointing(capsys):
    _refused(capsys, ["plan", "configs/qwen3_8b_deepmath.yaml", "optim.activation_checkpointing=false"],
             "plan: the learner needs", "optim.activation_checkpointing=true")


def test_plan_refuses_full_finetuning_of_8b_on_80gb(capsys):
    _refused(capsys, ["plan", "configs/llama31_8b_gsm8k.yaml", "lora.rank=full"], "plan: the learner needs")


def test_plan_refuses_an_engine_share_without_room_for_one_sequence(capsys):
    _refused(capsys, ["plan", "configs/qwen3_8b_deepmath.yaml", "sampler.gpu_memory_utilization=0.22"],
             "plan: the engine's share", "model.max_model_len")


def test_plan_activation_memory_scales_with_the_token_budget():
    from rl_lora.config import load_config
    from rl_lora.plan import make_plan

    def act(tokens):
        cfg = load_config("configs/qwen3_8b_deepmath.yaml", [f"optim.tokens_per_microbatch={tokens}",
                                                            "optim.activation_checkpointing=false"])
        return dict((label, gib) for label, gib, _ in make_plan(cfg, cfg.model.path).rows)["activations"]

    assert act(32768) == pytest.approx(2 * act(16384))
    assert act(4096) == act(2048) == act(9216)  # one 9216-token sample is never split: it is the floor


def test_train_runs_the_plan_on_gpu(make_config, no_model, capsys, monkeypatch):
    """With a GPU visible, train refuses a run that cannot fit the GPU memory it is given, before any model."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = make_config(model={"gpu_memory_gib": 1.0})  # the fixed CUDA reserve alone exceeds what is left
    _refused(capsys, ["train", str(cfg)], "plan: the learner needs")
