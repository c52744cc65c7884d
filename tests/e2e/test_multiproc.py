"""The engine layout a GPU user gets: vLLM's engine core in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1,
vLLM's default; the CPU runs here default to the in-process engine). Every engine-starting path of `rl-lora train`
runs here once in that layout: LoRA pushes of several adapters, full-FT weight pushes, and an engine rebuild
(sampler_crash: the engine is shut down for real) that reloads the live adapters or the pushed weights.

Each run passes the push check after every push (sampler logprobs == learner logprobs on a probe), so an engine that
serves stale weights or adapters fails it."""

import os
import subprocess
import sys

import pytest
from runhelpers import ROOT, TESTS, step_rows

pytestmark = pytest.mark.slow

# vLLM prefixes every log line of its engine-core process with this: proof the engine ran in a child process
ENGINE_CORE_PROCESS = "(EngineCore"


def _train_multiproc(cfg, faults: str = "", timeout: int = 900):
    env = {"PYTHONPATH": f"{TESTS}:{ROOT}", "WANDB_MODE": "disabled", "PATH": f"{os.path.dirname(sys.executable)}:"
           "/usr/bin:/bin", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    if faults:
        env["RL_LORA_FAULTS"] = faults
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", "train", str(cfg)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


def test_two_adapters_push_and_rebuild_in_a_multiprocess_engine(tmp_path, make_config):
    """Two LoRA adapters pushed every step into an engine-core process; at step 2 the engine dies and is rebuilt
    (a new engine-core process) with both live adapters."""
    cfg = make_config(adapters=[{"name": "a", "lr": 5e-3}, {"name": "b", "lr": 2e-2, "target_modules": "attention"}],
                      sampler={"max_loras": 3}, train={"steps": 3, "save_every": 3, "eval_samples": 1})
    res = _train_multiproc(cfg, faults="sampler_crash@2")
    assert res.returncode == 0, res.stderr[-4000:]
    log = res.stdout + res.stderr
    assert log.count(ENGINE_CORE_PROCESS) > 0 and "restarting the engine and reloading 2 live adapter" in log
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["sampler/restarts"] for r in rows] == [0.0, 1.0, 1.0]
    for r in rows:
        assert r["push/probe_gap"] < 1e-3  # both adapters, also after the rebuild
        assert abs(r["a/is/ratio_mean"] - 1) < 1e-3 and abs(r["b/is/ratio_mean"] - 1) < 1e-3


def test_full_finetune_pushes_weights_into_a_multiprocess_engine(tmp_path, make_config):
    """lora.rank: full: the learner's weights are pushed into the engine-core process every step (before: `TypeError:
    Object of type <class 'function'> is not serializable`); after the engine dies at step 2 the rebuilt engine gets
    the last pushed weights. The push check fails if the engine serves any other weights."""
    cfg = make_config(lora={"rank": "full"}, optim={"lr": 1e-3}, train={"steps": 3, "save_every": 3, "eval_samples": 1})
    res = _train_multiproc(cfg, faults="sampler_crash@2")
    assert res.returncode == 0, res.stderr[-4000:]
    assert ENGINE_CORE_PROCESS in res.stdout + res.stderr
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["sampler/restarts"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["push/probe_gap"] < 1e-3 for r in rows)
    assert all(abs(r["is/ratio_mean"] - 1) < 1e-3 for r in rows)  # on-policy: the engine served the pushed weights


def test_a_64_adapter_grid_of_mixed_ranks_and_kinds_on_qwen3(tmp_path):
    """`rl-lora grid` with 64 adapters of one run on a model the other tests do not use (tiny Qwen3), in this
    layout, with top_p: ranks 1, 2, 4 and 13 (13 shared scalars) and LoRA+ in one engine (rank 16: rl-lora's CPU
    path), 8 variants x 4 LRs x 2 seeds. Every adapter is pushed and checked every step, exported at its own rank,
    and every cell gets a held-out result."""
    import json

    import yaml
    from runhelpers import write_config
    from safetensors.torch import load_file
    from tiny_models import qwen3

    model = qwen3(tmp_path / "qwen3")
    cfg = yaml.safe_load(write_config(tmp_path, str(model), sampler={"samples_per_prompt": 2, "top_p": 0.9},
                                      train={"steps": 2, "save_every": 0, "eval_samples": 1},
                                      data={"eval_size": 2}).read_text())
    cfg["train"]["output_dir"] = str(tmp_path / "g")
    variants = [{"name": "r1"}, {"name": "r4", "rank": 4}, {"name": "attn", "target_modules": "attention"},
                {"name": "mlp2", "target_modules": "mlp", "rank": 2}, {"name": "lp", "lora_plus_ratio": 16},
                {"name": "sc", "trainable": "scalars"},
                {"name": "sc13", "trainable": "scalars", "scalars": {"count": 13, "share": "model"}}, {"name": "r1b"}]
    cfg["grid"] = {"lrs": [1e-3, 3e-3, 1e-2, 3e-2], "seeds": [0, 1], "variants": variants}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"PYTHONPATH": f"{TESTS}:{ROOT}", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    res = subprocess.run([sys.executable, "-m", "rl_lora.cli", "grid", str(path), "--quiet"], capture_output=True,
                         text=True, cwd=ROOT, timeout=1200, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert ENGINE_CORE_PROCESS in res.stdout + res.stderr
    run = tmp_path / "g" / "lora"
    rows = step_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["push/probe_gap"] < 1e-3 for r in rows)  # 64 adapters of 4 ranks served as the learner has them
    result = json.loads((tmp_path / "g" / "grid.json").read_text())
    assert len(result["cells"]) == 64 and all(c["accuracy"] is not None for c in result["cells"])
    ranks = {"r1": 1, "r4": 4, "attn": 1, "mlp2": 2, "lp": 1, "sc": 1, "sc13": 13, "r1b": 1}
    for v, r in ranks.items():
        name = f"{v}-lr=0.01-s1"
        assert json.loads((run / "adapters" / name / "adapter_config.json").read_text())["r"] == r, name
        a = next(t for n, t in load_file(str(run / "adapters" / name / "adapter_model.safetensors")).items()
                 if "lora_A" in n)
        assert a.shape[0] == r, name
