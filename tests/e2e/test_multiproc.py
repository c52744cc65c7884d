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
