"""Output folders never lose work: a fresh run refuses another run's folder, --overwrite moves it aside, pruning
keeps this run's newest checkpoints by step number, every checkpoint file is fsynced, and --resume refuses a
changed model or adapter shape and applies changed optimizer settings. Fast tests drive rl_lora.cli.main and
rl_lora.checkpoint with fake learners (no vLLM); one slow test replays the reported scenario end to end."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from runhelpers import run_cli, step_rows

from rl_lora import checkpoint, cli, rundir
from rl_lora.config import ALL_LINEAR, load_config
from rl_lora.learner import lora
from rl_lora.policy import Adapters


class FakeLearner:
    """What checkpoint.save/load use of a Learner (through its policy, rl_lora/policy.py): PEFT adapter dirs (real
    files) and real AdamW optimizers."""

    def __init__(self, names=("adapter",), lr=1e-3, betas=(0.9, 0.99), rank=1, alpha=32.0, targets=ALL_LINEAR,
                 model_path="model"):
        self.names, self.rank, self.alpha, self.targets, self.model_path = list(names), rank, alpha, targets, model_path
        self.params = [torch.nn.Parameter(torch.zeros(2, 3)) for _ in self.names]
        self.optimizers = [torch.optim.AdamW([p], lr=lr, betas=betas) for p in self.params]

    @property
    def num_adapters(self):
        return len(self.names)

    def adapter_dirname(self, k):
        return "adapter" if len(self.names) == 1 else f"adapters/{self.names[k]}"

    def write_adapter(self, path, k):
        lora.write_peft_adapter(path, {"w": self.params[k].detach().clone()},
                                lora.peft_config(self.rank, self.alpha, self.targets, self.model_path))

    def load_adapter(self, path, k):
        from safetensors.torch import load_file

        with torch.no_grad():
            self.params[k].copy_(load_file(str(Path(path) / "adapter_model.safetensors"))["w"])

    def optimizer_states(self):
        return [o.state_dict() for o in self.optimizers]

    def load_optimizer_states(self, states):
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)

    def step(self):
        for p, o in zip(self.params, self.optimizers):
            p.grad = torch.ones_like(p)
            o.step()


def _save(run_dir, step, learner=None, run_id="this-run", **state):
    return checkpoint.save(run_dir, step, Adapters(learner or FakeLearner()),
                           {"data_position": 0, "version": step, "run_id": run_id, **state})


def _steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def _latest_ok(run_dir):
    name = (run_dir / "checkpoints" / "latest").read_text()
    assert checkpoint.latest(run_dir) == run_dir / "checkpoints" / name, f"latest names {name}, not complete"
    return name


# ---------------------------------------------------------------------------------------------------------------
# checkpoint.py: pruning, latest, fsync, optimizer settings


def test_pruning_keeps_this_runs_newest_and_never_another_runs(tmp_path):
    """The reported bug: a 4-step run's step_3/4 in the folder, a new run's step_2 was pruned as soon as written."""
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, run_id="earlier-run")
    for step in (1, 2):
        _save(tmp_path, step, run_id="new-run")
        assert _latest_ok(tmp_path) == f"step_{step:06d}"
    assert _steps(tmp_path) == ["step_000001", "step_000002", "step_000003", "step_000004"]
    assert json.loads((tmp_path / "checkpoints/step_000004/state.json").read_text())["run_id"] == "earlier-run"


def test_pruning_is_by_step_number_not_name(tmp_path):
    """step_1000000 sorts before step_999999 by name: pruning by name deleted the checkpoint just written."""
    for step in (999_998, 999_999, 1_000_000):
        _save(tmp_path, step)
        assert _latest_ok(tmp_path) == f"step_{step:06d}"
    assert _steps(tmp_path) == ["step_1000000", "step_999999"]
    _save(tmp_path, 1_000_001)
    assert _steps(tmp_path) == ["step_1000000", "step_1000001"]


def test_every_file_and_directory_entry_of_a_checkpoint_is_fsynced(tmp_path, monkeypatch):
    """Adapter files inside checkpoint subfolders, their directories, the checkpoint dir, and checkpoints/ after
    the rename and after `latest` is replaced (in that order)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _save(tmp_path, 1, FakeLearner(names=("a", "b")))
    root = tmp_path / "checkpoints"
    final = root / "step_000001"
    # paths were fsynced while still in the temp dir: name them as they are now
    synced = {re.sub(r"/\.tmp-step_000001-[^/]+", "/step_000001", p) for kind, p in events if kind == "fsync"}
    expected = {str(p) for p in final.rglob("*")} | {str(final)}
    assert expected - synced == set()
    assert {str(final / "adapters/a/adapter_model.safetensors"), str(final / "adapters/a")} <= synced
    i_rename = events.index(("replace", str(final)))
    i_pointer = events.index(("replace", str(root / "latest")))
    assert ("fsync", str(root)) in events[i_rename:i_pointer], "the rename is not made durable before `latest`"
    assert ("fsync", str(root)) in events[i_pointer:], "the new `latest` is not made durable"
    assert ("fsync", str(root / ".latest.tmp")) in events[:i_pointer]


def test_resume_applies_this_configs_optimizer_settings_and_keeps_the_moments(tmp_path):
    trained = FakeLearner(lr=1e-3, betas=(0.9, 0.99))
    for _ in range(3):
        trained.step()
    path = _save(tmp_path, 3, trained)
    resumed = FakeLearner(lr=3e-4, betas=(0.8, 0.95))
    checkpoint.load(path, Adapters(resumed))
    group = resumed.optimizers[0].param_groups[0]
    assert group["lr"] == 3e-4 and tuple(group["betas"]) == (0.8, 0.95)  # torch alone brings back 1e-3, 0.9/0.99
    old, new = trained.optimizers[0].state[trained.params[0]], resumed.optimizers[0].state[resumed.params[0]]
    assert torch.equal(old["exp_avg"], new["exp_avg"]) and float(new["step"]) == 3.0
    assert torch.equal(resumed.params[0], trained.params[0])


# ---------------------------------------------------------------------------------------------------------------
# rl-lora train into a used folder (rl_lora.cli.main in process; the model never loads)


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))} | {".": path.stat().st_mtime_ns}


def _files(path: Path, tree: dict | None = None) -> dict:
    """Every file's bytes (of `tree`, else of the folder now)."""
    return {k: v[0] for k, v in (tree or _tree(path)).items() if k != "."}


def _earlier_run(run: Path, marker: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "notes.txt").write_text("the user's own file")
    if marker == "checkpoints/step":
        _save(run, 4)
        (run / "checkpoints" / "latest").unlink()
    elif marker == "checkpoints/latest":
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "latest").write_text("step_000004")
    elif marker in ("adapter", "adapters/lr=0.001", "model", "eval"):
        (run / marker).mkdir(parents=True)
        (run / marker / "adapter_model.safetensors").write_bytes(b"trained")
    else:
        (run / marker).write_text('{"step": 1, "reward/mean": 0.5}\n')


def _main(capsys, *argv):
    rc = cli.main(["train", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("marker", ["checkpoints/step", "checkpoints/latest", "adapter", "adapters/lr=0.001", "model",
                                    "eval", "metrics.jsonl"])
def test_fresh_run_into_another_runs_folder_refuses_and_changes_nothing(tmp_path, capsys, marker):
    run = tmp_path / "run"
    _earlier_run(run, marker)
    before = _tree(run)
    # a model path that does not exist: the refusal comes first, before the model is even looked for
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"train: {{output_dir: '{run}'}}\nmodel: {{path: '{tmp_path}/no-such-model'}}\n")
    for extra in ([], ["train.steps=0"]):  # train.steps=0 would write an untrained adapter over the trained one
        rc, _, err = _main(capsys, cfg_file, *extra)
        assert rc == 2, err
        assert err.count("\n") == 1 and str(run) in err and "another run's results" in err
        assert "--resume" in err and "--overwrite" in err and "another train.output_dir" in err
        assert _tree(run) == before


def test_empty_folder_or_unrelated_files_are_used(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's own file")
    (run / "data").mkdir()
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"train: {{output_dir: '{run}'}}\nmodel: {{path: '{tmp_path}/no-such-model'}}\n")
    rc, _, err = _main(capsys, cfg_file)
    assert rc == 2 and "model.path" in err and "another run" not in err  # past the folder check
    assert rundir.previous_results(run) == []


class _Stop(Exception):
    pass


@pytest.fixture
def no_engine(monkeypatch):
    """Stop train() where the first model would load (the sampler fleet, built first by its Session)."""
    from rl_lora import train

    def stop(*a, **k):
        raise _Stop("reached the model")

    monkeypatch.setattr(train, "build_fleet", stop)


def test_overwrite_moves_the_earlier_run_aside_after_the_checks(tmp_path, capsys, make_config, no_engine):
    run = tmp_path / "run"
    _earlier_run(run, "adapter")
    _save(run, 2)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    earlier = {k: v for k, v in _files(run).items() if k != "notes.txt"}
    cfg = make_config()
    # a config error found after the folder check: nothing moves
    rc, _, err = _main(capsys, cfg, "model.max_model_len=40", "--overwrite")
    assert rc == 2 and "exceeds the context" in err
    assert not list(tmp_path.glob("run.old-*")) and (run / "adapter").is_dir()
    with pytest.raises(_Stop):
        _main(capsys, cfg, "--overwrite")
    out = capsys.readouterr().out
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved to {aside}" in out
    assert _files(aside) == earlier  # every byte kept
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]  # the user's file stays
    assert _main(capsys, cfg, "--overwrite", "--resume")[0] == 2


def _checkpointed_run(run: Path, cfg_file: Path, signature=True, names=("adapter",), **fake) -> Path:
    """A run folder whose latest checkpoint (step 2) was trained with the config `cfg_file`."""
    cfg = load_config(cfg_file)
    learner = FakeLearner(names=names, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.target_modules,
                          **fake)
    sig = {"signature": rundir.run_signature(cfg)} if signature else {}
    path = _save(run, 2, learner, **sig)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    return path


@pytest.mark.parametrize("signature", [True, False], ids=["signature", "adapter-files-only"])
@pytest.mark.parametrize("overrides, changed", [
    (["lora.rank=2"], "lora.rank=1; this config has lora.rank=2"),
    (["lora.alpha=16"], "lora.alpha=32; this config has lora.alpha=16"),
    (["lora.target_modules=attention"], ("lora.target_modules=down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,"
                                         "v_proj; this config has lora.target_modules=k_proj,o_proj,q_proj,v_proj")),
    (["lora.rank=full"], "lora.rank=1; this config has lora.rank=full ("),
    (["adapters=[{name: a}, {name: b}]", "sampler.max_loras=3"], "adapters=a,b"),
])
def test_resume_with_a_changed_adapter_shape_is_refused_with_the_diff(tmp_path, capsys, make_config, no_engine,
                                                                     overrides, changed, signature):
    cfg = make_config()
    run = tmp_path / "run"
    _checkpointed_run(run, cfg, signature=signature)
    before = _tree(run)
    rc, _, err = _main(capsys, cfg, *overrides, "--resume")
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("rl-lora: error: --resume: step_000002 was trained with ")
    assert changed in err
    assert _files(run) == _files(run, before)  # (the folder's mtime: preflight's write probe)


def test_resume_with_another_model_is_refused(tmp_path, capsys, make_config, tiny_model, no_engine):
    other = shutil.copytree(tiny_model, tmp_path / "other-model")
    cfg = make_config()
    _checkpointed_run(tmp_path / "run", cfg)
    rc, _, err = _main(capsys, cfg, f"model.path={other}", "--resume")
    assert rc == 2 and f"this config has model.path={other}" in err and f"model.path={tiny_model}" in err


def test_resume_with_new_optimizer_settings_applies_and_says_so(tmp_path, capsys, make_config, no_engine):
    cfg = make_config()  # optim.lr 5e-3
    _checkpointed_run(tmp_path / "run", cfg)
    with pytest.raises(_Stop):
        _main(capsys, cfg, "optim.lr=1e-3", "optim.beta2=0.95", "--resume")
    out = capsys.readouterr().out
    assert "the new ones apply from step 3" in out
    assert "optim.lr 0.005 -> 0.001" in out and "optim.beta2 0.99 -> 0.95" in out


def test_resume_refusals_for_a_broken_pointer_and_too_few_steps(tmp_path, capsys, make_config, no_engine):
    cfg = make_config()
    run = tmp_path / "run"
    _checkpointed_run(run, cfg)
    rc, _, err = _main(capsys, cfg, "train.steps=1", "--resume")
    assert rc == 2 and "train.steps: 1 is below the checkpoint's step (2" in err
    (run / "checkpoints" / "latest").write_text("step_000005")  # what the pruning bug left behind
    rc, _, err = _main(capsys, cfg, "--resume")
    assert rc == 2 and "names 'step_000005', which is missing or incomplete" in err and "step_000002" in err
    shutil.rmtree(run / "checkpoints")
    (run / "adapter").mkdir()
    rc, _, err = _main(capsys, cfg, "--resume")  # a trained adapter but nothing to resume: never start over on it
    assert rc == 2 and "no checkpoint to continue from" in err


# ---------------------------------------------------------------------------------------------------------------
# End to end: the reported scenario


@pytest.mark.slow
def test_a_used_folder_is_refused_then_overwritten_without_losing_the_earlier_run(tmp_path, make_config):
    run = tmp_path / "run"
    cfg = make_config(train={"steps": 4, "save_every": 1, "eval_samples": 1})
    res = run_cli(cfg, "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    earlier = _tree(run)
    for extra in (["train.steps=2"], ["train.steps=0"]):
        res = run_cli(cfg, *extra, "--quiet")
        assert res.returncode == 2 and "another run's results" in res.stderr.strip().splitlines()[-1]
        assert _tree(run) == earlier
    res = run_cli(cfg, "train.steps=2", "--quiet", "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _latest_ok(run) == "step_000002" and [r["step"] for r in step_rows(run)] == [1, 2]
    (aside,) = tmp_path.glob("run.old-*")
    assert _files(aside) == _files(run, earlier)
    assert _latest_ok(aside) == "step_000004" and _steps(aside) == ["step_000003", "step_000004"]
