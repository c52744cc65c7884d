import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rl_lora.config import ConfigError, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]


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



# ----------------------------------------------------------------------------------------------------------
# Field docs, --print-config, checks beside their section


def _sections():
    from rl_lora.config import AdapterEntry, Config
    from rl_lora.eval.command import EvalConfig

    out = [Config, AdapterEntry, EvalConfig]
    out += [type(getattr(Config(), f.name)) for f in dataclasses.fields(Config) if f.name != "adapters"]
    return out


def test_every_field_of_every_section_has_a_one_line_doc():
    for cls in _sections():
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            assert doc and "\n" not in doc and len(doc) <= 200, f"{cls.__name__}.{f.name}: doc {doc!r}"


def test_print_config_shows_every_key_with_its_doc_loads_back_and_loads_no_model(tmp_path):
    from rl_lora.config import AdapterEntry, Config, field_doc

    code = ("import sys\nfrom rl_lora.cli import main\n"
            "rc = main(['train', 'configs/demo_cpu.yaml', '--print-config', 'train.steps=7', "
            "'adapters=[{name: a, lr: 1e-3}, {name: b, rank: 2}]', 'sampler.max_loras=3'])\n"
            "assert 'torch' not in sys.modules and 'vllm' not in sys.modules, 'heavy import on --print-config'\n"
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    cfg = Config()
    for f in dataclasses.fields(Config):
        if f.name == "adapters":
            continue
        assert f"{f.name}:  # {f.metadata['doc']}" in out
        for g in dataclasses.fields(getattr(cfg, f.name)):
            assert f"  {g.name}: " in out and f"  # {g.metadata['doc']}" in out, f"{f.name}.{g.name}"
    assert "  steps: 7  # " in out
    assert f"  - name: a  # {field_doc(AdapterEntry, 'name')}" in out
    assert f"    rank: 2  # {field_doc(AdapterEntry, 'rank')}" in out
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    assert load_config(printed) == load_config(ROOT / "configs/demo_cpu.yaml", [
        "train.steps=7", "adapters=[{name: a, lr: 1e-3}, {name: b, rank: 2}]", "sampler.max_loras=3"])


def test_train_help_lists_the_sections_with_their_docs_and_print_config():
    from rl_lora.config import Config

    res = _cli("train", "--help")
    assert res.returncode == 0 and "--print-config" in res.stdout and "one-line doc" in res.stdout
    for f in dataclasses.fields(Config):
        assert f"  {f.name:<9} {f.metadata['doc']}" in res.stdout


@pytest.mark.parametrize("override, message", [
    ("sampler.top_p=1.5", "sampler.top_p: must be in (0, 1], got 1.5"),
    ("optim.beta2=1", "optim.beta2: must be in [0, 1), got 1.0"),
    ("lora.rnak=2", "unknown config key 'lora.rnak' (known: alpha, expert_rank, lora_plus_ratio, rank, scalars, "
                    "target_modules, trainable); did you mean 'lora.rank'?"),
    ("adapters=[{rank: 0}]", "adapters[0].rank: must be an integer >= 1, got 0"),
    ("adapters=[{rnak: 2}]", "did you mean 'adapters[0].rank'?"),
    ("adapters=[{lr: fast}]", "adapters[0].lr: must be a finite number >= 0 or 'auto', got 'fast'"),
    ("adapters=[3]", "adapters[0]: expected a mapping, got 3"),
    ("adapters={name: a}", "adapters: expected a list"),
    ("adapters=[{lr: true}]", "adapters[0].lr: expected a number, a string or null, got True"),
    ("lora.rank=1.5", "lora.rank: expected an integer or a string, got 1.5"),
])
def test_field_checks_name_the_key_and_the_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_each_section_checks_its_own_fields():
    from rl_lora.config import LossConfig, SamplerConfig

    with pytest.raises(ConfigError, match=r"^sampler\.top_k: must be -1 \(off\) or >= 1, got 0$"):
        SamplerConfig(top_k=0).check()
    with pytest.raises(ConfigError, match=r"^loss\.is_cap: 1\.1 with loss\.ppo_clip=0\.2"):
        LossConfig(ppo_clip=0.2, is_cap=1.1).check()
    SamplerConfig().check()
    LossConfig(ppo_clip=0.2).check()


def test_adapters_are_typed_entries_and_written_back_as_given():
    from rl_lora.config import AdapterEntry, adapter_specs, to_dict

    cfg = load_config(None, ["adapters=[{name: a, lr: 1e-3}, {rank: 2, data: {operations: '*'}}]", "lora.alpha=16"])
    assert cfg.adapters == [AdapterEntry(name="a", lr=1e-3), AdapterEntry(rank=2, data={"operations": "*"})]
    assert to_dict(cfg)["adapters"] == [{"name": "a", "lr": 1e-3}, {"rank": 2, "data": {"operations": "*"}}]
    a, b = adapter_specs(cfg)
    assert (a.name, a.lr, a.rank, a.alpha) == ("a", 1e-3, 1, 16.0)
    assert (b.name, b.lr, b.rank, b.data.operations, b.data.max_operand) == ("adapter1", 2e-3, 2, "*", 99)
