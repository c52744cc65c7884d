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


@pytest.mark.parametrize("temperature", [0.005, 1e-6])
def test_temperature_below_vllms_floor_is_refused(temperature):
    """vLLM 0.32 raises a temperature in (0, 0.01) to 0.01 and goes greedy below 1e-5 (untempered logprobs): the
    learner's 1/T would then score another distribution than the one sampled."""
    with pytest.raises(ConfigError, match=r"sampler\.temperature: .*below 0\.01") as err:
        load_config(None, [f"sampler.temperature={temperature}"])
    assert "\n" not in str(err.value)
    assert load_config(None, ["sampler.temperature=0.01"]).sampler.temperature == 0.01


def test_ppo_takes_is_cap_as_its_dual_clip_bound():
    with pytest.raises(ConfigError, match=r"loss\.is_cap: 1.1 with loss\.ppo_clip=0\.2: .*dual-clip"):
        load_config(None, ["loss.ppo_clip=0.2", "loss.is_cap=1.1"])
    assert load_config(None, ["loss.ppo_clip=0.2"]).loss.is_cap == 2.0  # the default applies as c = 2
    assert load_config(None, ["loss.ppo_clip=0.2", "loss.is_cap=inf"]).loss.is_cap == float("inf")

