"""Sub-rank-1 adapters (rl_lora/learner/tinylora.py, `lora.trainable: scalars`): the mapping, zero init = base with a nonzero
first gradient, sharing, the optimizer seeing only the scalars, the PEFT export (PEFT's logits, a plain LoRA learner
serving it under the push check), bit-exact checkpoints, config errors, the capacity line; and, slow, a real
`rl-lora train` through vLLM."""

import dataclasses

import peft  # a dev dependency: the round trip must run, never skip
import pytest
import torch
from sample_builders import base_and_peft_logits

from rl_lora.config import ALL_LINEAR, AdapterSpec, ConfigError, ScalarsConfig, adapter_specs, load_config
from rl_lora.learner import tinylora
from rl_lora.learner.learner import Learner, TrainSample
from rl_lora.learner.lora import LoRALinear, copy_peft_tensors

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 11]])


def _spec(count=2, share="none", directions="random", seed=0, **kw) -> AdapterSpec:
    return AdapterSpec(rank=count, target_modules=list(ALL_LINEAR), lr=0.05, seed=seed,
                       scalars=ScalarsConfig(count=count, share=share, directions=directions), **kw)


def _learner(tiny_model, *specs, **kw) -> Learner:
    return Learner(tiny_model, list(specs), **kw)


def _samples(n=4, adapter=0):
    g = torch.Generator().manual_seed(0)
    return [TrainSample(torch.randint(0, 250, (6,), generator=g).tolist(),
                        torch.randint(0, 250, (5,), generator=g).tolist(), [-5.5] * 5, 1.0 if i % 2 else -1.0, adapter)
            for i in range(n)]


def _set_scalars(learner, k=0, seed=0, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in tinylora.scalars_of(learner.adapter_sets[k]):
            s.copy_(std * torch.randn(s.shape, generator=gen))


# -- the mapping ------------------------------------------------------------------------------------------------


def test_layer_is_base_plus_scaled_fixed_directions_times_scalars():
    base = torch.nn.Linear(8, 6, bias=False)
    layer = LoRALinear(base)
    U, Vt = tinylora.random_directions("x", 6, 8, 3, seed=0)
    s = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    layer.add_fixed(0, Vt, U, s, scale=32 / 3)
    x = torch.randn(4, 8)
    expected = x @ (base.weight + 32 / 3 * U @ torch.diag(s) @ Vt).T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(U.T @ U, torch.eye(3))  # orthonormal, unit-norm directions
    torch.testing.assert_close(Vt @ Vt.T, torch.eye(3))
    assert not layer.lora_A[0].requires_grad and not layer.lora_B[0].requires_grad  # only s trains


def test_random_directions_depend_on_seed_and_module_only():
    a = tinylora.random_directions("model.layers.0.q_proj", 16, 8, 2, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, tinylora.random_directions("model.layers.0.q_proj", 16, 8, 2, 3)))
    assert not torch.equal(a[0], tinylora.random_directions("model.layers.1.q_proj", 16, 8, 2, seed=3)[0])
    assert not torch.equal(a[0], tinylora.random_directions("model.layers.0.q_proj", 16, 8, 2, seed=4)[0])


def test_svd_directions_are_the_top_singular_vectors():
    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    U, Vt = tinylora.svd_directions(w, 2, seed=0)
    u, sv, vh = torch.linalg.svd(w.double())
    for i in range(2):  # up to a common sign: u_i^T W v_i = sigma_i
        torch.testing.assert_close((U[:, i].double() @ w.double() @ Vt[i].double()).abs(), sv[i], rtol=1e-5, atol=0)
        assert abs(abs(float(U[:, i].double() @ u[:, i])) - 1) < 1e-5


def test_share_groups():
    assert tinylora.group_of("model.layers.3.self_attn.q_proj", "layer") == "model.layers.3"
    assert tinylora.group_of("model.layers.3.self_attn.q_proj", "none") == "model.layers.3.self_attn.q_proj"
    assert tinylora.group_of("model.layers.3.mlp.down_proj", "model") == "model"


@pytest.mark.parametrize("share, groups_per_layer", [("none", 7), ("layer", 1), ("model", None)])
def test_sharing_modes_count_and_share_parameters(tiny_model, share, groups_per_layer):
    from rl_lora.science import read_shape, scalar_parameters

    learner = _learner(tiny_model, _spec(count=3, share=share))
    layers = learner.model.config.num_hidden_layers
    expected = 3 * (groups_per_layer * layers if groups_per_layer else 1)
    assert learner.num_trainable() == expected == scalar_parameters(read_shape(tiny_model), 3, share, ALL_LINEAR)
    assert [g["name"] for g in learner.optimizer.param_groups] == ["scalars"]  # the only thing the optimizer sees
    views = learner.adapters
    assert len(views) == 7 * layers
    if share == "model":  # one Parameter object in every module
        assert len({id(tinylora.gains_of(v)) for v in views.values()}) == 1


# -- the learner ------------------------------------------------------------------------------------------------


def test_zero_init_is_the_base_and_its_first_gradient_is_not_zero(tiny_model):
    from transformers import AutoModelForCausalLM

    learner = _learner(tiny_model, _spec(count=2, share="layer"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(learner.model(input_ids=IDS).logits, base(input_ids=IDS).logits)
    learner.backward(_samples())
    grads = [p.grad for p in learner.params]
    assert all(g is not None and torch.count_nonzero(g) == g.numel() for g in grads)  # every scalar of every layer
    # unlike LoRA with both factors at zero (a dead init: no gradient ever reaches A or B)
    layer = LoRALinear(torch.nn.Linear(8, 6, bias=False))
    layer.add_adapter(0, rank=1, alpha=32)
    with torch.no_grad():
        layer.lora_A[0].zero_()
    layer(torch.randn(4, 8)).square().sum().backward()
    assert torch.count_nonzero(layer.lora_A[0].grad) == 0 and torch.count_nonzero(layer.lora_B[0].grad) == 0


def test_first_step_moves_every_scalar_and_nothing_else(tiny_model):
    learner = _learner(tiny_model, _spec(count=2, directions="svd"))
    frozen = {n: p.detach().clone() for n, p in learner.model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in learner.params]
    metrics, _ = learner.train_step(_samples())
    assert metrics["loss/skipped"] == 0.0
    assert all(torch.count_nonzero(p - b) == p.numel() for p, b in zip(learner.params, before))
    assert {n for n, p in learner.model.named_parameters() if p.requires_grad} == {
        n for n, p in learner.model.named_parameters() if any(p is q for q in learner.params)}
    for n, p in learner.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"  # the base and the directions


def test_a_grid_mixes_lora_and_scalars_adapters(tiny_model):
    lora = AdapterSpec(name="lora", rank=1, target_modules=list(ALL_LINEAR), lr=1e-2)
    learner = _learner(tiny_model, lora, dataclasses.replace(_spec(count=1, share="model"), name="tiny"))
    assert [sum(p.numel() for p in ps) for ps in learner.param_sets][1] == 1
    before = [[p.detach().clone() for p in ps] for ps in learner.param_sets]
    learner.train_step(_samples(2, adapter=0) + _samples(2, adapter=1))
    for ps, bs in zip(learner.param_sets, before):
        assert any(not torch.equal(p, b) for p, b in zip(ps, bs))
    assert tinylora.is_scalars(learner.adapter_sets[1]) and not tinylora.is_scalars(learner.adapter_sets[0])


# -- export and state -------------------------------------------------------------------------------------------


def test_peft_export_is_a_standard_lora_with_the_learners_logits(tiny_model, tmp_path):
    from safetensors.torch import load_file

    learner = _learner(tiny_model, _spec(count=3, share="layer", directions="svd"))
    _set_scalars(learner)
    learner.write_adapter(tmp_path / "adapter")
    config = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert config.r == 3 and config.lora_alpha == 32.0
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for name, view in learner.adapters.items():
        d_out, d_in = view.base.weight.shape
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (3, d_in) and b.shape == (d_out, 3)
        torch.testing.assert_close(b, view.module.lora_B[view.slot] * tinylora.gains_of(view).detach())  # U diag(s)
    with torch.no_grad():
        ours = learner.model(input_ids=IDS).logits
    plain, theirs = base_and_peft_logits(tiny_model, tmp_path / "adapter", IDS)
    assert (ours - plain).abs().max() > 1e-3  # the scalars do something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # a plain rank-3 LoRA learner loading the PEFT files computes the same policy
    other = Learner(tiny_model, [AdapterSpec(rank=3, target_modules=list(ALL_LINEAR))])
    copy_peft_tensors(other.adapters, tensors)
    with torch.no_grad():
        torch.testing.assert_close(other.model(input_ids=IDS).logits, ours, atol=1e-5, rtol=1e-5)


def test_adapter_files_restore_scalars_and_directions_bit_for_bit(tiny_model, tmp_path):
    learner = _learner(tiny_model, _spec(count=2, share="model", directions="svd"))
    _set_scalars(learner)
    learner.write_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / tinylora.STATE_FILE).is_file()
    other = _learner(tiny_model, _spec(count=2, share="model", directions="random", seed=5))  # other directions
    other.load_adapter(tmp_path / "adapter")
    assert all(torch.equal(p, q) for p, q in zip(other.params, learner.params))
    for name, view in learner.adapters.items():
        mine = other.adapters[name]
        assert torch.equal(mine.lora_A, view.lora_A) and torch.equal(mine.lora_B, view.lora_B)
    with torch.no_grad():
        assert torch.equal(other.model(input_ids=IDS).logits, learner.model(input_ids=IDS).logits)
    with pytest.raises(ValueError, match="restored from its scalars"):
        copy_peft_tensors(learner.adapters, {})  # B = U diag(s) would not give s back exactly
    with pytest.raises(ValueError, match="scalars.1 is missing"):  # one set of scalars saved, one per layer wanted
        _learner(tiny_model, _spec(count=2, share="layer")).load_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="scalars.0 is shape"):
        _learner(tiny_model, _spec(count=1, share="model")).load_adapter(tmp_path / "adapter")


def test_checkpoint_resume_is_bit_exact(tiny_model, tmp_path):
    from rl_lora import checkpoint
    from rl_lora.policy import Adapters

    def run(steps, start=None):
        learner = _learner(tiny_model, _spec(count=2, share="layer"))
        policy = Adapters(learner)
        if start is not None:
            checkpoint.load(start, policy)
        for _ in range(steps):
            learner.train_step(_samples())
        return learner, policy

    straight, _ = run(3)
    first, policy = run(2)
    path = checkpoint.save(tmp_path, 2, policy, {"run_id": "x", "data_position": [0], "version": 0})
    resumed, _ = run(1, start=path)
    assert all(torch.equal(p, q) for p, q in zip(resumed.params, straight.params))


def test_push_check_passes_through_a_plain_lora_engine_and_the_previous_version_swaps_back(tiny_model, make_config):
    """The engine is a plain rank-r LoRA learner fed the pushed PEFT tensors (what vLLM does with them): the push
    check sees the learner's policy, and scoring the previous version restores the live scalars bit for bit."""
    from rl_lora.policy import Adapters
    from rl_lora.rollout import Completion
    from rl_lora.sampling.fleet import _Fleet
    from rl_lora.sampling.sampler import AdapterRef
    from rl_lora.sync import Run

    engine = Learner(tiny_model, [AdapterSpec(rank=2, target_modules=list(ALL_LINEAR))], temperature=0.7)

    class Fleet(_Fleet):
        def __init__(self):
            super().__init__()
            self.num_engines, self.served = 1, {}

        def drain(self):
            pass

        def push_adapter(self, version, slot, tensors, config):
            assert config["r"] == 2
            self.served[version] = {n: t.clone() for n, t in tensors.items()}
            return AdapterRef(version, "")

        def evict(self, version):
            self.served.pop(version, None)

        def _submit(self, req):
            pass

        def result(self, req):
            out = []
            for ids, version, seed in zip(req.prompt_ids_P, req.versions_P, req.seeds_P):
                copy_peft_tensors(engine.adapters, self.served[version])
                gen = torch.Generator().manual_seed(seed)
                tokens = [torch.randint(3, 250, (req.sampling["max_tokens"],), generator=gen).tolist()
                          for _ in range(req.n)]
                lps = engine.score([TrainSample(ids, t, [0.0] * len(t), 0.0) for t in tokens])
                out.append([Completion(t, lp, "", "length", version) for t, lp in zip(tokens, lps)])
            return out

    cfg = load_config(make_config(lora={"trainable": "scalars", "scalars": {"count": 2}}),
                      ["sampler.temperature=0.7"])
    learner = Learner(tiny_model, adapter_specs(cfg), temperature=0.7)
    run = Run(cfg, Fleet(), learner, Adapters(learner), probe_ids=[1, 40, 41, 42, 43, 2, 1, 60])
    run.push(0)
    for step in (1, 2):
        learner.train_step(_samples())
        live = [p.detach().clone() for p in learner.params]
        result = run.push(step)
        assert result.gap < 1e-5 and result.probe["push/probe_gap_prev"] > 10 * result.gap, result.probe
        assert all(torch.equal(p, q) for p, q in zip(learner.params, live))


# -- config, capacity, lr-suggest -------------------------------------------------------------------------------


def test_config_resolves_scalars_adapters(tmp_path):
    cfg = load_config(None, ["lora.trainable=scalars", "lora.scalars={count: 13, share: model, directions: svd}"])
    (spec,) = adapter_specs(cfg)
    assert spec.rank == 13 and spec.scalars == ScalarsConfig(count=13, share="model", directions="svd")
    grid = load_config(None, ["adapters=[{name: lora}, {name: tiny, trainable: scalars, scalars: {share: layer}, "
                              "lr: 0.05}]"])
    lora, small = adapter_specs(grid)
    assert lora.scalars is None and lora.rank == 1
    assert small.scalars == ScalarsConfig(share="layer") and small.rank == 1 and small.lr == 0.05


@pytest.mark.parametrize("overrides, message", [
    (["lora.trainable=tiny"], r"lora\.trainable: must be lora or scalars"),
    (["lora.scalars.share=layers"], r"lora\.scalars\.share: must be none, layer or model"),
    (["lora.scalars.directions=pca"], r"lora\.scalars\.directions: must be random or svd"),
    (["lora.scalars.count=0"], r"lora\.scalars\.count: must be >= 1"),
    (["lora.scalars.cout=2"], r"unknown config key 'lora\.scalars\.cout'.*did you mean 'lora\.scalars\.count'"),
    (["lora.trainable=scalars", "lora.rank=4", "lora.scalars.count=2"], r"lora\.rank: 4 with lora\.trainable"),
    (["lora.trainable=scalars", "lora.rank=full"], r"lora\.trainable: scalars trains an adapter"),
    (["lora.trainable=scalars", "lora.lora_plus_ratio=16"], r"lora\.lora_plus_ratio: a scalars adapter"),
    (["adapters=[{name: a}, {name: b, scalars: {count: 2}}]"], r"adapters\[1\]\.scalars: set for a LoRA adapter"),
    (["adapters=[{name: a}, {name: b, trainable: scalars, scalars: {count: 2}, rank: 3}]"],
     r"adapters\[1\]\.rank: 3 on a scalars adapter"),
    (["adapters=[{name: a}, {name: b, trainable: scalars, scalars: {shared: model}}]"],
     r"unknown config key 'adapters\[1\]\.scalars\.shared'"),
    (["adapters=[{name: a}, {name: b, trainable: scalars, scalars: {share: all}}]"],
     r"adapters\[1\]\.scalars\.share: must be none, layer or model"),
    (["adapters=[{name: a}, {name: b, trainable: scalar}]"], r"adapters\[1\]\.trainable: must be lora or scalars"),
])
def test_bad_scalars_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(None, overrides)
    assert "\n" not in str(exc.value)


def test_resume_refuses_a_changed_adapter_kind_or_scalars_shape(tmp_path):
    import json

    from rl_lora.rundir import check_resume, run_signature

    old = load_config(None, ["lora.trainable=scalars", "lora.scalars.share=layer"])
    (tmp_path / "state.json").write_text(json.dumps({"step": 1, "data_position": [0],
                                                     "signature": run_signature(old)}))
    assert check_resume(old, tmp_path, 1) == []
    for change in (["lora.trainable=lora"], ["lora.trainable=scalars", "lora.scalars.share=model"]):
        with pytest.raises(ConfigError, match=r"--resume: .* was trained with lora\.scalars=count=1 share=layer"):
            check_resume(load_config(None, change), tmp_path, 1)


def test_count_above_a_modules_dimension_is_refused_before_the_model_loads(tiny_model, make_config):
    from rl_lora.checks import check_model

    cfg = load_config(make_config(), ["lora.trainable=scalars", "lora.scalars.count=65"])  # head_dim 64 (k/v: 64)
    with pytest.raises(ConfigError, match=r"lora\.scalars\.count: 65 directions exceed the smallest adapted "):
        check_model(cfg, tiny_model)


def test_capacity_line_and_lr_suggest_count_scalars(tiny_model, capsys):
    from rl_lora import cli
    from rl_lora.science import SCALARS_LR, capacity_check, read_shape

    shape = read_shape(tiny_model)
    line = capacity_check(shape, 13, ALL_LINEAR, 640, scalars=ScalarsConfig(count=13, share="model")).message()
    assert line.startswith("capacity: 13 trainable scalars (~26 bits) for 640 episodes") and "sub-rank-1" in line
    assert cli.main(["lr-suggest", "--model", tiny_model, "--steps", "10", "--scalars", "2", "--share", "layer"]) == 0
    out = capsys.readouterr().out
    layers = shape.num_layers
    assert f"{2 * layers} trainable scalars" in out and f"optim.lr: {SCALARS_LR:g}" in out


def test_lr_auto_gives_scalars_adapters_their_own_lr(tiny_model, make_config):
    from rl_lora.science import SCALARS_LR
    from rl_lora.train import apply_science

    cfg = load_config(make_config(adapters=[{"name": "lora"}, {"name": "tiny", "trainable": "scalars"}]),
                      ["optim.lr=auto"])
    resolved, notes = apply_science(cfg, tiny_model)
    lora, small = adapter_specs(resolved)
    assert small.lr == SCALARS_LR and lora.lr != SCALARS_LR and isinstance(lora.lr, float)
    assert any("trainable scalars" in n for n in notes)


# -- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rank1_scalars_adapter_is_served_by_the_rank1_sampling_path(sampler, tiny_model, tmp_path):
    """The learner's export of a count-1 adapter, pushed to the real engine: vLLM's logprobs equal the learner's."""
    learner = _learner(tiny_model, _spec(count=1, share="none"))
    _set_scalars(learner, std=0.5)
    ref = sampler.push(7001, lambda d: learner.write_adapter(d))  # the PEFT files and scalars.safetensors
    prompt = [1, 40, 41, 42, 43, 2, 1, 60]
    (group,) = sampler.generate([prompt], n=4, adapters=[ref], seed=5, temperature=1.0, max_tokens=8)
    scored = learner.score([TrainSample(prompt, c.token_ids, c.logprobs, 0.0) for c in group])
    gap = sum(abs(a - b) for c, lp in zip(group, scored) for a, b in zip(c.logprobs, lp)) / sum(map(len, scored))
    assert sampler.rank1_path and gap < 1e-4, gap
    sampler.evict(7001)


@pytest.mark.slow
def test_train_runs_scalars_adapters_through_the_sampler(tmp_path, tiny_model):
    """`rl-lora train` with a LoRA adapter and two scalars adapters in one run (K = 3): every push check passes,
    rho = 1 at step 1, the scalars move, and the exported adapters carry their state file."""
    from runhelpers import run_cli, step_rows, write_config
    from safetensors.torch import load_file

    adapters = [{"name": "lora", "lr": 5e-3},
                {"name": "one", "trainable": "scalars", "lr": 0.05},
                {"name": "svd3", "trainable": "scalars", "lr": 0.05,
                 "scalars": {"count": 3, "share": "model", "directions": "svd"}}]
    cfg = write_config(tmp_path, tiny_model, adapters=adapters, train={"steps": 3, "save_every": 0})
    res = run_cli(cfg, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["push/probe_gap"] < 1e-4 for r in rows), [r["push/probe_gap"] for r in rows]
    for name in ("one", "svd3"):
        assert abs(rows[0][f"{name}/is/ratio_mean"] - 1) < 1e-3
        state = load_file(str(tmp_path / "run" / "adapters" / name / tinylora.STATE_FILE))
        scalars = torch.cat([v for k, v in state.items() if k.startswith("scalars.")])
        assert torch.count_nonzero(scalars) == scalars.numel()
    assert "3 trainable scalars" in res.stdout
