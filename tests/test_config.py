import subprocess
import sys
from pathlib import Path

import pytest

from rl_lora.config import ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", ["lora.rank=1", "optim.lr=3e-4", "loss.is_cap=inf"])
    assert cfg.lora.rank == 1 and cfg.optim.lr == pytest.approx(3e-4) and cfg.loss.is_cap == float("inf")
    assert parse_override("train.output_dir=runs/x") == ("train.output_dir", "runs/x")


@pytest.mark.parametrize("override, key", [
    ("lora.rnak=2", "lora.rnak"),
    ("bogus.x=1", "bogus"),
    ("lora.rank=0", "lora.rank"),
    ("lora.rank=one", "lora.rank"),
    ("sampler.samples_per_prompt=1", "sampler.samples_per_prompt"),
    ("sampler.temperature=0", "sampler.temperature"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("train.steps=1.5", "train.steps"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_bad_key_is_one_line_nonzero_and_loads_no_model(tmp_path):
    out = tmp_path / "run"
    res = _cli("train", "configs/demo_cpu.yaml", "lora.rnak=1", f"train.output_dir={out}")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "lora.rnak" in res.stderr
    assert not out.exists()


def test_cli_help_is_instant():
    res = _cli("train", "--help")
    assert res.returncode == 0 and "overrides" in res.stdout


def test_cli_missing_model_path(tmp_path):
    out = tmp_path / "run"
    res = _cli("train", "configs/demo_cpu.yaml", f"model.path={tmp_path}/no-such-model", f"train.output_dir={out}",
               "reward.num_workers=0")
    assert res.returncode == 2, res.stderr
    assert "model.path" in res.stderr and res.stderr.strip().count("\n") == 0
    assert not (out / "checkpoints").exists()


def test_cli_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    res = _cli("train", "configs/demo_cpu.yaml", f"data.source={empty}", f"train.output_dir={out}")
    assert res.returncode == 2 and "no rows" in res.stderr
    assert not (out / "checkpoints").exists()
