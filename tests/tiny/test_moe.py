"""MoE LoRA in the learner (rl_lora/learner/moe.py): per-expert adapters on transformers 5.x's fused 3-D expert parameters,
checked against the model's own forward with the adapters merged into its weights; K adapters routed by rows;
gradients; PEFT export/import (PEFT's logits equal ours) and vLLM's loader; the expert rank; config checks before
any model loads; the capacity rule. No engine starts here (tests/e2e/test_moe_e2e.py trains through the sampler)."""

import json

import pytest
import tiny_models
import torch
from torch.func import functional_call

from rl_lora.config import AdapterSpec, ConfigError, load_config
from rl_lora.learner import lora, moe


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return str(tiny_models.build_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_moe")))


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _randomize(views, seed=0, scale=0.05):
    """Trained-looking adapters: B != 0 (and A re-drawn) everywhere, seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in views.values():
            v.lora_A.copy_(torch.randn(v.lora_A.shape, generator=g) * 0.1)
            v.lora_B.copy_(torch.randn(v.lora_B.shape, generator=g) * scale)


def _merged_params(reference, views, differentiable=False):
    """The base model's parameters with every adapter merged in: W + s B A (fused experts: per expert, gate and up
    stacked as the model's gate_up_proj), as tensors of the adapters' parameters (autograd flows through them)."""
    params = dict(reference.named_parameters())
    out = {}
    for name, v in views.items():
        if isinstance(v, moe.ExpertView):
            experts = name.rpartition(".")[0]
            delta = v.scale * torch.bmm(v.lora_B, v.lora_A)  # [E, d_out, d_in]
            if v.projection == "down_proj":
                key = f"{experts}.down_proj"
                out[key] = out.get(key, params[key]) + delta
            else:
                key = f"{experts}.gate_up_proj"
                f = delta.shape[1]
                pad = torch.zeros_like(delta)
                full = torch.cat([delta, pad], 1) if v.projection == "gate_proj" else torch.cat([pad, delta], 1)
                assert full.shape == params[key].shape, f
                out[key] = out.get(key, params[key]) + full
        else:
            key = f"{name}.weight"
            out[key] = params[key] + v.scale * v.lora_B @ v.lora_A
    if not differentiable:
        out = {k: t.detach() for k, t in out.items()}
    return out


def _ids(rows=4, length=19, seed=0):
    return torch.randint(3, 250, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_tiny_moe_has_fused_experts(tiny_moe):
    model = _base(tiny_moe)
    names = moe.fused_expert_modules(model)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 256, 128)  # [E, 2F, H]
    assert moe.active_experts(model) == 2


@pytest.mark.parametrize("rank,expert_rank,expected", [(1, "auto", 1), (4, "auto", 2), (2, 3, 3)])
def test_expert_lora_equals_merged_weights(tiny_moe, rank, expert_rank, expected):
    """Our per-token routed adapters == the model's own forward with W + s B A merged into each expert's weights."""
    model = _base(tiny_moe)
    reference = _base(tiny_moe)
    _, (views,) = lora.inject_adapters(model, [AdapterSpec(rank=rank, expert_rank=expert_rank)])
    experts = [v for v in views.values() if isinstance(v, moe.ExpertView)]
    assert len(experts) == 2 * 3 and {v.rank for v in experts} == {expected}
    assert all(v.lora_A.shape[0] == 4 for v in experts)  # one adapter per expert
    _randomize(views)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
        theirs = functional_call(reference, _merged_params(reference, views), (ids,)).logits
        base = reference(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapters do something
    # merged and unmerged sum in another order: 2.2e-5 on one logit of 24,320 measured on an AMX Xeon (fp32)
    torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=1e-5)


def test_gradients_match_merged_weights_and_base_stays_frozen(tiny_moe):
    model = _base(tiny_moe)
    reference = _base(tiny_moe)
    _, (views,) = lora.inject_adapters(model, [AdapterSpec(rank=2, expert_rank=2)])
    _randomize(views)
    ids = _ids(rows=2)
    model(ids).logits.logsumexp(-1).mean().backward()
    ours = {n: (v.lora_A.grad.clone(), v.lora_B.grad.clone()) for n, v in views.items()}
    for v in views.values():
        v.lora_A.grad = v.lora_B.grad = None
    functional_call(reference, _merged_params(reference, views, differentiable=True), (ids,)).logits \
        .logsumexp(-1).mean().backward()
    for name, v in views.items():
        torch.testing.assert_close(ours[name][0], v.lora_A.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(ours[name][1], v.lora_B.grad, atol=1e-6, rtol=1e-4)
    router = model.model.layers[0].mlp.gate.weight
    fused = model.model.layers[0].mlp.experts.base.gate_up_proj
    assert not router.requires_grad and router.grad is None  # router frozen by default
    assert not fused.requires_grad and fused.grad is None
    expert_b = views["model.layers.0.mlp.experts.down_proj"].lora_B.grad
    assert (expert_b.flatten(1).abs().sum(1) > 0).all()  # every expert got tokens and a gradient


def test_two_adapters_route_rows(tiny_moe):
    """K = 2 on the MoE base (all layers vs attention only, the paper's comparison as two adapters of one run): each
    adapter's rows equal that adapter alone; the attention-only adapter has no expert parameters."""
    model = _base(tiny_moe)
    specs = [AdapterSpec(name="all", rank=1, seed=1), AdapterSpec(name="attn", rank=1, seed=2,
                                                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])]
    routing, (all_views, attn_views) = lora.inject_adapters(model, specs)
    assert any(isinstance(v, moe.ExpertView) for v in all_views.values())
    assert not any(isinstance(v, moe.ExpertView) for v in attn_views.values())
    _randomize(all_views, 1)
    _randomize(attn_views, 2)
    ids = _ids(rows=5)
    with torch.no_grad():
        routing.segments = [(0, 0, 3), (1, 3, 5)]
        mixed = model(ids).logits
        routing.segments = [(0, 0, 5)]
        alone0 = model(ids).logits
        routing.segments = [(1, 0, 5)]
        alone1 = model(ids).logits
    # a batch of both adapters vs each alone: another summation order, 1.3e-5 on one logit measured on an AMX Xeon
    torch.testing.assert_close(mixed[:3], alone0[:3], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[3:], alone1[3:], atol=5e-5, rtol=1e-5)
    assert (alone0 - alone1).abs().max() > 1e-2


@pytest.mark.parametrize("rank", [1, 4])
def test_peft_loads_exported_adapter_with_equal_logits(tiny_moe, tmp_path, rank):
    """Trained (B != 0) adapters, exported: PEFT 0.21 on the transformers 5.x model gives our logits. Rank 4 on
    2 active experts gives rank-2 experts: the rank/alpha patterns must carry them."""
    from peft import PeftModel

    model = _base(tiny_moe)
    _, (views,) = lora.inject_adapters(model, [AdapterSpec(rank=rank)])
    _randomize(views, 3)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
    config = lora.peft_config(rank, 32.0, list(AdapterSpec().target_modules), tiny_moe, views)
    assert ("rank_pattern" in config) == (rank == 4)  # rank 1: experts at rank 1 = r, no pattern needed
    lora.write_peft_adapter(tmp_path / "adapter", lora.peft_state_dict(views), config)
    keys = set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()))
    assert {"r", "lora_alpha", "target_modules"} <= keys
    peft_model = PeftModel.from_pretrained(_base(tiny_moe), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (ours - _base(tiny_moe)(ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_export_keys_are_per_expert_and_load_back_bit_exact(tiny_moe, tmp_path):
    """The file holds one PEFT module per expert (vLLM's Qwen3-MoE layout); loading it back (resume) restores every
    parameter bit for bit."""
    model = _base(tiny_moe)
    _, (views,) = lora.inject_adapters(model, [AdapterSpec(rank=4)])
    _randomize(views, 4)
    tensors = lora.peft_state_dict(views)
    prefix = "base_model.model.model.layers.1.mlp.experts."
    assert tensors[f"{prefix}3.up_proj.lora_A.weight"].shape == (2, 128)  # [e, H]
    assert tensors[f"{prefix}3.down_proj.lora_B.weight"].shape == (128, 2)  # [H, e]
    assert not any(k.endswith("gate_up_proj.lora_A.weight") for k in tensors)
    lora.write_peft_adapter(tmp_path / "a", tensors, lora.peft_config(4, 32.0, ["gate_proj"], tiny_moe, views))
    fresh = _base(tiny_moe)
    _, (back,) = lora.inject_adapters(fresh, [AdapterSpec(rank=4, seed=9)])
    lora.load_peft_adapter(tmp_path / "a", back)
    for name, v in views.items():
        assert torch.equal(v.lora_A, back[name].lora_A) and torch.equal(v.lora_B, back[name].lora_B), name
    ids = _ids(rows=2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_vllm_loader_accepts_exported_adapter(tiny_moe, tmp_path):
    """vLLM 0.32's own adapter loader (no engine): the per-expert modules Qwen3-MoE expects, each at the expert
    rank with scaling alpha / e."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    model = _base(tiny_moe)
    _, (views,) = lora.inject_adapters(model, [AdapterSpec(rank=4)])
    _randomize(views, 5)
    lora.write_peft_adapter(tmp_path / "a", lora.peft_state_dict(views),
                            lora.peft_config(4, 32.0, list(AdapterSpec().target_modules), tiny_moe, views))
    expected = {"qkv_proj", "o_proj", "q_proj", "k_proj", "v_proj"}
    expected |= {f"experts.{i}.{p}" for i in range(4) for p in moe.EXPERT_PROJECTIONS}
    helper = PEFTHelper.from_local_dir(str(tmp_path / "a"), 1024)
    loaded = LoRAModel.from_local_checkpoint(str(tmp_path / "a"), expected, helper, device="cpu")
    w = loaded.get_lora("model.layers.0.mlp.experts.2.gate_proj")
    assert w is not None and w.rank == 2
    assert w.scaling == pytest.approx(32.0 / 2)
    v = views["model.layers.0.mlp.experts.gate_proj"]
    torch.testing.assert_close(w.lora_a, v.lora_A[2].detach())
    q = loaded.get_lora("model.layers.0.self_attn.q_proj")
    assert q.rank == 4 and q.scaling == pytest.approx(32.0 / 4)


@pytest.mark.parametrize("rank", [1, 4])
def test_mixtral_export_uses_its_checkpoint_names(tmp_path, rank):
    """Mixtral's files name the experts as its checkpoints do (`block_sparse_moe.experts.<i>.w1` gate, `w3` up, `w2`
    down; rl_lora/learner/moe.py FILE_NAMES): vLLM's loader, with the names vLLM gives the layer, finds every expert's
    adapter there, and PEFT 0.21 converts them onto transformers 5's fused parameters with our logits."""
    from peft import PeftModel
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    path = str(tiny_models.build_tiny_mixtral(tmp_path / "mixtral"))
    model = _base(path)
    _, (views,) = lora.inject_adapters(model, [AdapterSpec(rank=rank)])
    _randomize(views, 6)
    config = lora.peft_config(rank, 32.0, list(AdapterSpec().target_modules), path, views)
    assert {"w1", "w2", "w3"} <= set(config["target_modules"]) and "gate_proj" not in config["target_modules"]
    tensors = lora.peft_state_dict(views)
    lora.write_peft_adapter(tmp_path / "a", tensors, config)
    prefix = "base_model.model.model.layers.0.block_sparse_moe.experts.2."
    gate_up = views["model.layers.0.mlp.experts.gate_proj"], views["model.layers.0.mlp.experts.up_proj"]
    assert torch.equal(tensors[f"{prefix}w1.lora_A.weight"], gate_up[0].lora_A[2].detach())
    assert torch.equal(tensors[f"{prefix}w3.lora_B.weight"], gate_up[1].lora_B[2].detach())
    assert not any(".mlp.experts." in k for k in tensors)

    expected = {"qkv_proj", "o_proj", "q_proj", "k_proj", "v_proj"}
    expected |= {f"experts.{i}.{p}" for i in range(4) for p in ("w1", "w2", "w3")}
    helper = PEFTHelper.from_local_dir(str(tmp_path / "a"), 1024)
    loaded = LoRAModel.from_local_checkpoint(str(tmp_path / "a"), expected, helper, device="cpu")
    w = loaded.get_lora("model.layers.0.block_sparse_moe.experts.2.w3")  # the module vLLM's Mixtral builds
    assert w is not None and w.rank == max(1, rank // 2) and w.scaling == pytest.approx(32.0 / w.rank)
    torch.testing.assert_close(w.lora_a, gate_up[1].lora_A[2].detach())

    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
        theirs = PeftModel.from_pretrained(_base(path), str(tmp_path / "a")).eval()(ids).logits
        assert (ours - _base(path)(ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_old_layout_linear_experts_get_the_expert_rank():
    """Experts stored as a ModuleList of Linear MLPs (older layouts) go through LoRALinear at the expert rank."""

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(8, 4), torch.nn.Linear(8, 4),
                                                            torch.nn.Linear(4, 8))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([MLP() for _ in range(4)])
            self.q_proj = torch.nn.Linear(8, 8)

    model = torch.nn.Module()
    model.layer = Block()
    model.config = type("C", (), {"num_experts_per_tok": 2})()
    _, (views,) = lora.inject_adapters(model, [AdapterSpec(rank=4, target_modules=["q_proj", "gate_proj", "up_proj",
                                                                                 "down_proj"])])
    assert views["layer.experts.3.down_proj"].rank == 2 and views["layer.q_proj"].rank == 4


def test_expert_rank_config_checks():
    assert load_config(None, ["lora.expert_rank=3"]).lora.expert_rank == 3
    assert load_config(None, []).lora.expert_rank == "auto"
    for bad in ("0", "-1", "many"):
        with pytest.raises(ConfigError, match="lora.expert_rank"):
            load_config(None, [f"lora.expert_rank={bad}"])
    with pytest.raises(ConfigError, match=r"adapters\[0\].expert_rank"):
        load_config(None, ["adapters=[{name: a, expert_rank: 0}]"])


def test_target_modules_naming_no_expert_projection_fail_before_load(tiny_moe, monkeypatch):
    """On the MoE base, a target that names neither a linear layer nor an expert projection is one ConfigError
    from the meta-device model (no weights loaded); the MLP names reach the fused experts."""
    from rl_lora import checks

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded"))
    cfg = load_config(None, [f"model.path={tiny_moe}", "lora.target_modules=[w1, w3]"])
    with pytest.raises(ConfigError) as exc:
        checks.check_model(cfg, tiny_moe)
    message = str(exc.value)
    assert "\n" not in message and "w1" in message and "expert projection" in message and "gate_proj" in message
    checks.check_model(load_config(None, [f"model.path={tiny_moe}", "lora.target_modules=mlp"]), tiny_moe)
    checks.check_model(load_config(None, [f"model.path={tiny_moe}", "lora.target_modules=attention"]), tiny_moe)


def test_learner_trains_expert_adapters(tiny_moe):
    """One learner step on the MoE base: every expert adapter's B moves, the router and the experts' weights do
    not; scores are finite."""
    from sample_builders import build_learner

    from rl_lora.learner.learner import TrainSample

    learner = build_learner(tiny_moe, AdapterSpec(lr=1e-2))
    router = learner.model.model.layers[0].mlp.gate.weight.detach().clone()
    fused = learner.model.model.layers[0].mlp.experts.base.gate_up_proj.detach().clone()
    before = {n: v.lora_B.detach().clone() for n, v in learner.adapters.items()}
    g = torch.Generator().manual_seed(0)
    samples = [TrainSample(torch.randint(3, 250, (6,), generator=g).tolist(),
                           torch.randint(3, 250, (9,), generator=g).tolist(), [-5.0] * 9, adv)
               for adv in (1.0, -1.0, 0.5, -0.5)]
    learner.train_step(samples)
    expert_views = [n for n, v in learner.adapters.items() if isinstance(v, moe.ExpertView)]
    assert len(expert_views) == 6
    for name in expert_views:
        moved = (learner.adapters[name].lora_B - before[name]).flatten(1).abs().sum(1)
        assert (moved > 0).sum() >= 3, name  # 4 experts, top-2 of 60 tokens: nearly all get tokens
    assert torch.equal(learner.model.model.layers[0].mlp.gate.weight, router)
    assert torch.equal(learner.model.model.layers[0].mlp.experts.base.gate_up_proj, fused)


QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                     num_kv_heads=4, head_dim=128, num_experts=128, experts_per_token=8, moe_intermediate_size=768)


def test_capacity_counts_experts_at_rank_over_active_experts():
    """The paper's rule: each expert's rank = rank / active experts (the inverse of what science.py had)."""
    from rl_lora.science import ModelShape, adapter_parameters, capacity_check

    shape = ModelShape(**QWEN3_30B_A3B)
    attention = 2048 + 4096 + 2 * (2048 + 512) + 4096 + 2048
    experts = 128 * 3 * (2048 + 768)  # per rank-1 expert adapter, per layer
    assert adapter_parameters(shape, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]) == 8 * attention * 48
    assert adapter_parameters(shape, 8, list(AdapterSpec().target_modules)) == (8 * attention + experts) * 48
    assert adapter_parameters(shape, 16, ["down_proj"]) == 2 * 128 * (768 + 2048) * 48  # rank 16 -> 2 per expert
    assert adapter_parameters(shape, 1, ["gate_proj"], expert_rank=3) == 3 * 128 * (2048 + 768) * 48
    line = capacity_check(shape, 1, list(AdapterSpec().target_modules), 1000).message()
    assert "8x the paper's ratio" in line and "\n" not in line
    assert "the paper's ratio)" in capacity_check(shape, 8, ["up_proj"], 1000).message()
    assert "expert" not in capacity_check(shape, 8, ["q_proj"], 1000).message()


def test_capacity_count_matches_the_learner_on_the_moe(tiny_moe):
    from sample_builders import build_learner

    from rl_lora.science import adapter_parameters, read_shape

    shape = read_shape(tiny_moe)
    assert (shape.num_experts, shape.experts_per_token, shape.moe_layers) == (4, 2, 2)
    for rank in (1, 4):
        learner = build_learner(tiny_moe, AdapterSpec(rank=rank))
        assert adapter_parameters(shape, rank, list(AdapterSpec().target_modules)) == learner.num_trainable()


def test_lr_suggest_counts_moe_adapters(tmp_path, capsys):
    from rl_lora import cli

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
         "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
         "num_experts_per_tok": 8, "moe_intermediate_size": 768}))
    assert cli.main(["lr-suggest", "--model", str(tmp_path), "--steps", "100"]) == 0
    out = capsys.readouterr().out
    attention = 2048 + 4096 + 2 * (2048 + 512) + 4096 + 2048
    assert f"{(attention + 128 * 3 * (2048 + 768)) * 48:,} adapter parameters" in out
    assert "8x the paper's ratio" in out


def test_qwen3_30b_a3b_recipe_loads_and_its_plan_fits(tmp_path, capsys):
    """configs/qwen3_30b_a3b_deepmath.yaml against a local copy of Qwen3-30B-A3B's config.json (no hub here)."""
    from pathlib import Path

    from rl_lora import cli

    recipe = Path(__file__).resolve().parents[2] / "configs/qwen3_30b_a3b_deepmath.yaml"
    cfg = load_config(recipe)
    assert (cfg.model.dtype, cfg.sampler.max_tokens, cfg.lora.rank) == ("bfloat16", 8192, 1)
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
         "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
         "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
         "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False}))
    assert cli.main(["plan", str(recipe), f"model.path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    attention = 2048 + 4096 + 2 * (2048 + 512) + 4096 + 2048
    assert f"{(attention + 128 * 3 * (2048 + 768)) * 48:,} fp32 parameters" in out and "fits" in out


def test_expert_lora_of_an_unverified_moe_family_is_refused_before_load(tmp_path, monkeypatch):
    """Expert LoRA on an MoE family not verified end to end (PhiMoE: fused experts like Mixtral's, but its files and
    vLLM's names for them unchecked; Mixtral's were 0.21 nats/token apart before rl_lora/learner/moe.py FILE_NAMES) is
    refused in one line from the meta-device model; attention-only passes."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from rl_lora import checks

    path = str(tiny_models._build(tmp_path / "phimoe", PhimoeConfig, PhimoeForCausalLM, num_local_experts=4,
                                  num_experts_per_tok=2, tie_word_embeddings=False))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError) as exc:
        checks.check_model(load_config(None, [f"model.path={path}"]), path)  # default targets: experts included
    message = str(exc.value)
    assert "\n" not in message and "'phimoe'" in message and "target_modules: attention" in message
    checks.check_model(load_config(None, [f"model.path={path}", "lora.target_modules=attention"]), path)
