"""Preflight: problems found before any model loads, with one line naming the key and exit code 2."""

import time

import pytest
from runhelpers import run_cli

from rl_lora.config import ConfigError, load_config


def test_output_dir_not_writable(tmp_path, make_config):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    t0 = time.perf_counter()
    res = run_cli(make_config(train={"output_dir": str(blocker / "run")}))
    assert res.returncode == 2
    assert "train.output_dir" in res.stderr.strip().splitlines()[-1] and "not writable" in res.stderr
    assert time.perf_counter() - t0 < 60  # no engine was started


def test_disk_too_small_for_checkpoints(tmp_path, monkeypatch):
    import shutil

    from rl_lora import train

    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(ConfigError, match="train.output_dir: only 1 MiB free"):
        train.preflight(cfg, resume=False)


def test_context_too_short_fails_before_the_engine_starts(tmp_path, make_config):
    res = run_cli(make_config(model={"max_model_len": 40}))
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert "exceeds the context (40)" in last
    assert "Initializing" not in res.stderr and "vLLM" not in res.stdout  # no engine was built
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_max_model_len_beyond_the_model(tmp_path, make_config):
    res = run_cli(make_config(model={"max_model_len": 4096}))  # the tiny model has 1024 positions
    assert res.returncode == 2
    assert "model.max_model_len: 4096 exceeds the model's context (1024 tokens)" in res.stderr
