"""K adapters on one base: isolation, equality with K separate single-adapter learners and samplers, and the
whole loop with two adapters (issue 6)."""

import json
import random

import pytest
import torch
from runhelpers import metrics, run_cli, step_rows
from safetensors.torch import load_file
from sample_builders import adapter_samples, build_learner, perturb_B

from rl_lora.config import ALL_LINEAR, AdapterSpec
from rl_lora.learner.learner import Learner, TrainSample

ATTENTION = ALL_LINEAR[:4]


def _grads(learner: Learner, k: int) -> dict:
    return {name: (v.lora_A.grad.clone(), v.lora_B.grad.clone()) for name, v in learner.adapter_sets[k].items()}


SPECS = [AdapterSpec("all-r1", rank=1, target_modules=ALL_LINEAR, lr=1e-2, seed=0),
         AdapterSpec("attn-r2", rank=2, alpha=16, target_modules=ATTENTION, lr=3e-2, seed=1)]


@pytest.mark.parametrize("tokens_per_microbatch", [4096, 40])  # one mixed micro-batch / many small ones
def test_per_adapter_gradients_equal_separate_learners(tiny_model, tokens_per_microbatch):
    data = adapter_samples(0, seed=1) + adapter_samples(1, seed=2, n=5)
    random.Random(0).shuffle(data)
    joint = build_learner(tiny_model, *SPECS, temperature=0.7, tokens_per_microbatch=tokens_per_microbatch)
    perturb_B(joint, 7)
    joint.backward(data)
    for k, spec in enumerate(SPECS):
        alone = build_learner(tiny_model, spec, temperature=0.7)
        with torch.no_grad():  # the same B as adapter k of the joint learner
            for name in sorted(alone.adapters):
                alone.adapters[name].lora_B.copy_(joint.adapter_sets[k][name].lora_B)
        mine = [TrainSample(s.prompt_ids, s.completion_ids, s.sampler_logprobs, s.advantage, 0)
                for s in data if s.adapter == k]
        alone.backward(mine)
        got, want = _grads(joint, k), _grads(alone, 0)
        assert got.keys() == want.keys()
        for name in want:
            for g, w in zip(got[name], want[name]):
                assert w.abs().sum() > 0
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tokens_per_microbatch", [4096, 40])  # rows of both in one micro-batch / spread out
def test_an_adapter_gets_no_gradient_from_its_neighbours_rows(tiny_model, tokens_per_microbatch):
    """Adapter "quiet" has rows in the batch but advantage 0 (no loss of its own); "live" trains on its own rows.
    Both have B != 0, so a row routed through the wrong adapter would carry gradient into it: quiet's gradient
    must be exactly zero, live's must equal that of a learner without the neighbour, and one AdamW step (lr > 0)
    must leave quiet bit-identical. (Replaces an lr = 0 test: AdamW at lr 0 moves nothing whatever the
    gradient, so it could not see a leak.)"""
    specs = [AdapterSpec("quiet", lr=1e-2, target_modules=ALL_LINEAR, seed=0),
             AdapterSpec("live", lr=1e-2, target_modules=ALL_LINEAR, seed=1)]
    learner = build_learner(tiny_model, *specs, tokens_per_microbatch=tokens_per_microbatch)
    perturb_B(learner, 5)
    quiet = [TrainSample(s.prompt_ids, s.completion_ids, s.sampler_logprobs, 0.0, 0) for s in adapter_samples(0, seed=3)]
    live = adapter_samples(1, seed=4)
    learner.backward(quiet + live)
    for v in learner.adapter_sets[0].values():
        for p in (v.lora_A, v.lora_B):
            assert p.grad is None or not p.grad.any()
    alone = build_learner(tiny_model, *specs[1:])
    with torch.no_grad():
        for name, v in alone.adapters.items():
            v.lora_B.copy_(learner.adapter_sets[1][name].lora_B)
    alone.backward([TrainSample(s.prompt_ids, s.completion_ids, s.sampler_logprobs, s.advantage, 0) for s in live])
    got, want = _grads(learner, 1), _grads(alone, 0)
    for name in want:
        for g, w in zip(got[name], want[name]):
            assert w.abs().sum() > 0
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    before = [{n: (v.lora_A.detach().clone(), v.lora_B.detach().clone()) for n, v in views.items()}
              for views in learner.adapter_sets]
    _, (quiet_m, live_m) = learner.train_step(quiet + live)
    assert quiet_m["learn/tokens"] > 0 and quiet_m["loss/grad_norm"] == 0 and live_m["loss/grad_norm"] > 0
    for name, v in learner.adapter_sets[0].items():
        assert torch.equal(v.lora_A, before[0][name][0]) and torch.equal(v.lora_B, before[0][name][1])
    assert sum((v.lora_B - before[1][n][1]).abs().sum().item() for n, v in learner.adapter_sets[1].items()) > 0
    # each adapter exports as its own PEFT adapter
    assert learner.peft_config(0)["r"] == 1
    assert not torch.equal(*(learner.adapter_sets[k]["model.layers.0.mlp.down_proj"].lora_B for k in (0, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("gather", [False, True], ids=["one GEMM", "gathered per row"])
def test_one_sampler_call_equals_single_adapter_calls(sampler, tiny_model, gather, monkeypatch):
    """Two adapters in one generate call, same seeds: each group equals that adapter sampled alone (which takes the
    rank-1 path's one-GEMM form), in both forms of the mixed call (GATHER_MIN_SLOTS: a grid's many adapters)."""
    from rl_lora.sampling import vllm_cpu_lora

    monkeypatch.setattr(vllm_cpu_lora, "GATHER_MIN_SLOTS", 2 if gather else 10**6)
    learner = build_learner(tiny_model, SPECS[0], AdapterSpec("other", target_modules=ALL_LINEAR, seed=3),
                            temperature=0.7)
    perturb_B(learner, 11)
    with torch.no_grad():  # make the two policies clearly different
        for v in learner.adapter_sets[1].values():
            v.lora_B.mul_(-3)
    refs = [sampler.push(301 + k, lambda d, k=k: learner.write_adapter(d, k), evict_older=False) for k in range(2)]
    prompt = sampler.tokenizer.encode("What is 2 + 3?")
    kw = dict(n=4, seed=0, temperature=0.7, max_tokens=8)
    try:
        mixed = sampler.generate([prompt, prompt], adapters=refs, seeds=[77, 77], **kw)
        alone = [sampler.generate([prompt], adapters=[r], seeds=[77], **kw)[0] for r in refs]
    finally:
        for r in refs:
            sampler.evict(r.version)
    assert [c.token_ids for c in mixed[0]] != [c.token_ids for c in mixed[1]], "adapters should differ"
    for k in range(2):
        assert all(c.adapter_version == refs[k].version for c in mixed[k])
        assert [c.token_ids for c in mixed[k]] == [c.token_ids for c in alone[k]]
        for c, d in zip(mixed[k], alone[k]):
            assert max(abs(a - b) for a, b in zip(c.logprobs, d.logprobs)) < 1e-4
        scored = learner.score([TrainSample(prompt, c.token_ids, c.logprobs, 0.0, k) for c in mixed[k]])
        assert max(abs(a - b) for c, lp in zip(mixed[k], scored) for a, b in zip(c.logprobs, lp)) < 1e-3


def _train_then_resume(cfg, tmp_path):
    """2 steps, then --resume to 3: the run dir and its step rows (checked to be 1, 2, 3)."""
    res = run_cli(cfg, "--quiet", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(cfg, "train.steps=3", "--resume", "--quiet", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    rows = step_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    return run, rows


@pytest.mark.slow
def test_two_adapters_train_checkpoint_and_resume(tmp_path, make_config):
    cfg = make_config(adapters=[{"name": "frozen", "lr": 0}, {"name": "live", "lr": 5e-3, "target_modules": "attention"}],
                      sampler={"max_loras": 3}, train={"steps": 2, "save_every": 1, "eval_samples": 1})
    run, rows = _train_then_resume(cfg, tmp_path)
    for r in rows:
        assert {"frozen/reward/mean", "live/reward/mean", "frozen/loss/grad_norm", "live/is/ratio_mean"} <= r.keys()
        assert r["push/probe_gap"] < 1e-3  # both adapters checked after every push
    assert abs(rows[0]["frozen/is/ratio_mean"] - 1) < 1e-3 and abs(rows[0]["live/is/ratio_mean"] - 1) < 1e-3
    frozen = load_file(str(run / "adapters" / "frozen" / "adapter_model.safetensors"))
    live = load_file(str(run / "adapters" / "live" / "adapter_model.safetensors"))
    assert all(not t.any() for k, t in frozen.items() if "lora_B" in k)  # lr 0: B stays 0
    assert any(t.any() for k, t in live.items() if "lora_B" in k)
    assert not any("mlp" in k for k in live) and any("mlp" in k for k in frozen)  # attention-only baseline
    assert json.loads((run / "adapters" / "live" / "adapter_config.json").read_text())["target_modules"] == sorted(ATTENTION)
    ckpt = run / "checkpoints" / "step_000003"
    assert (ckpt / "adapters" / "frozen").is_dir() and (ckpt / "adapters" / "live").is_dir()
    results = json.loads((run / "eval" / "eval_results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["base", "frozen@3", "live@3"]


@pytest.mark.slow
def test_sixty_four_adapters_train_checkpoint_and_resume(tmp_path, make_config):
    """K = 64 rank-1 adapters of one base, end to end (issue 18): the engine's slots sized automatically, every
    adapter pushed, checked and stepped each step (the fused AdamW), each with its own LR, and a resume from a
    checkpoint continues all 64 optimizers."""
    K = 64
    cfg = make_config(adapters=[{"name": f"a{k}", "lr": 1e-3 * (1 + k % 8)} for k in range(K)],
                      sampler={"samples_per_prompt": 4}, data={"eval_size": 0},
                      train={"steps": 2, "save_every": 1, "prompts_per_step": 1})
    run, rows = _train_then_resume(cfg, tmp_path)
    for r in rows:
        assert r["push/probe_gap"] < 1e-3
        assert all(f"a{k}/loss/grad_norm" in r for k in range(K))
    learned = [k for k in range(K) if not rows[-1][f"a{k}/loss/skipped"] and rows[-1][f"a{k}/learn/tokens"]]
    assert learned, "some adapter should have learned at step 3"
    lora_b = [load_file(str(run / "adapters" / f"a{k}" / "adapter_model.safetensors")) for k in range(K)]
    moved = [k for k in range(K) if any(t.any() for n, t in lora_b[k].items() if "lora_B" in n)]
    assert len(moved) > K // 2  # most adapters had a group with reward variance in 3 steps
    a0 = [t for n, t in sorted(lora_b[moved[0]].items()) if "lora_B" in n]
    assert not all(torch.equal(x, y) for x, y in zip(a0, [t for n, t in sorted(lora_b[moved[1]].items())
                                                           if "lora_B" in n]))


@pytest.mark.slow
def test_tenants_train_on_their_own_data_and_rewards(tmp_path, make_config):
    """Two tenants in one run: a on the run's data (+ and -) and reward, b on its own data (products) with its own
    rewards (one of which always fails). Each completion is scored against its adapter's data by its adapter's
    rewards; each adapter is evaluated on its own held-out set; a resume restores both data streams."""
    contains_times = {"name": "reward_fixtures:prompt_contains", "kwargs": {"text": "*"}}
    cfg = make_config(data={"operations": "+-", "eval_size": 4},
                      adapters=[{"name": "a"}, {"name": "b", "data": {"operations": "*", "train_size": 40},
                                                "rewards": [contains_times, {"name": "reward_fixtures:explodes"}]}],
                      sampler={"max_loras": 3, "samples_per_prompt": 4}, reward={"rewards": [contains_times]},
                      train={"steps": 2, "prompts_per_step": 2, "save_every": 1, "eval_samples": 1, "eval_every": 0})
    run, rows = _train_then_resume(cfg, tmp_path)
    for r in rows:
        assert r["a/reward/mean"] == 0 and r["b/reward/mean"] == 1  # a never sees a product, b only products
        assert r["reward/errors"] == 2 * 4  # b's 2 prompts x 4 samples; a's reward list has no failing reward
    state = json.loads((run / "checkpoints" / "step_000003" / "state.json").read_text())
    assert isinstance(state["data_position"], list) and len(state["data_position"]) == 2
    for task, model in (("data", "a@3"), ("b-data", "b@3")):
        results = json.loads((run / "eval" / task / "eval_results.json").read_text())["results"]
        assert [r["model"] for r in results] == ["base", model]


@pytest.mark.parametrize("entry,message", [
    ({"rewards": [{"name": "math_answer", "wieght": 2}]},
     "adapters[1].rewards[0]: unknown key 'wieght' (known: name, weight, kwargs)"),
    ({"data": {"sorce": "x.jsonl"}}, "unknown config key 'adapters[1].data.sorce'"),
    ({"data": {"operations": "/"}}, "adapters[1].data.operations: must be a non-empty string of + - *, got '/'"),
    ({"data": {"source": "missing.jsonl"}}, "missing.jsonl"),
])
def test_adapter_rewards_and_data_are_checked_before_any_model_loads(tmp_path, make_config, entry, message):
    cfg = make_config(adapters=[{"lr": 1e-4}, {"lr": 3e-4, **entry}], sampler={"max_loras": 3})
    res = run_cli(cfg)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr.strip().splitlines()[-1]


def test_too_many_adapters_for_the_engine_is_a_config_error(tmp_path, make_config):
    cfg = make_config(adapters=[{"lr": 1e-4}, {"lr": 3e-4}, {"lr": 1e-3}], sampler={"max_loras": 2})
    res = run_cli(cfg)
    assert res.returncode == 2
    assert "sampler.max_loras" in res.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("adapters, expect", [([], 2), ([{"name": "a"}, {"name": "b"}, {"name": "c"}], 4)])
def test_engine_adapter_slots_default_to_k_plus_one(adapters, expect):
    from rl_lora.config import load_config, resident_loras

    assert resident_loras(load_config(None, [f"adapters={adapters}"])) == expect
    assert resident_loras(load_config(None, [f"adapters={adapters}", "sampler.max_loras=9"])) == 9


def test_sweep_flags_are_checked_before_any_model_loads(tmp_path, make_config):
    import subprocess
    import sys

    cfg = make_config()
    for lr, message in (("1e-4", "at least 2"), ("1e-4,x", "comma-separated"), ("1e-4,1e-4", "twice"),
                        ("1e-4,-1", ">= 0")):
        res = subprocess.run([sys.executable, "-m", "rl_lora.cli", "sweep", str(cfg), "--lr", lr],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and message in res.stderr.strip().splitlines()[-1], res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sweep_trains_every_lr_in_one_run_and_marks_the_best(tmp_path, make_config):
    import subprocess
    import sys

    from runhelpers import ROOT, TESTS

    cfg = make_config(train={"steps": 2, "save_every": 0, "eval_samples": 2}, data={"eval_size": 4})
    env = {"PYTHONPATH": f"{TESTS}:{ROOT}", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "rl_lora.cli", "sweep", str(cfg), "--lr", "0,5e-3", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads((run / "sweep.json").read_text())
    assert [a["adapter"] for a in result["adapters"]] == ["lr=0", "lr=0.005"]
    assert sum(a["best"] for a in result["adapters"]) == 1
    margin = result["best_vs_runner_up"]
    assert margin["ci95"][0] <= margin["delta"] <= margin["ci95"][1] and "best vs runner-up" in res.stdout
    assert all(a["heldout_avg"] is not None and a["train_reward_last"] is not None for a in result["adapters"])
    assert "| lr=0.005 |" in (run / "sweep.md").read_text() and "best" in res.stdout
    assert (run / "reward_curve.png").is_file()
    assert "max_loras: 3" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_full_finetune_baseline_runs_in_the_same_loop(tmp_path, make_config):
    """lora.rank: full trains every weight and overwrites the engine's weights in place after each step; the push
    check (sampler vs learner logprobs on a probe) proves the engine serves the updated weights."""
    cfg = make_config(lora={"rank": "full"}, optim={"lr": 1e-3}, train={"steps": 2, "save_every": 1, "eval_samples": 1})
    res = run_cli(cfg, "--quiet", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    rows = step_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["push/probe_gap"] < 1e-3 for r in rows)
    assert abs(rows[0]["is/ratio_mean"] - 1) < 1e-3 and rows[0]["learn/tokens"] > 0
    assert (run / "model" / "config.json").is_file() and not (run / "adapter").exists()
    results = json.loads((run / "eval" / "eval_results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["base", "full-ft@2"] and "delta_avg_vs_base" in results[1]
    assert "full-ft@2" in res.stdout  # the before/after table is printed
    assert any("eval/base_accuracy" in r and "eval/accuracy" in r for r in metrics(run))
    # without the in-place weight update the check fails loudly
    res = run_cli(cfg, "train.steps=3", "--resume", faults="stale_push@3", timeout=900)
    assert res.returncode == 1 and "push check failed" in res.stderr.strip().splitlines()[-1]
