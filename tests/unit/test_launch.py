"""The cluster launch layer (launch/, docs/cluster.md) without a cluster: the sbatch scripts run under plain bash
with fake `ray`, `srun`, `scontrol` and `torchrun` on PATH that record how they were called."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rl_lora.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SBATCH = sorted((ROOT / "launch").glob("*.sbatch"))
DEMO = ROOT / "configs/demo_cpu.yaml"  # validates offline; the scripts only read its sampler section

# Each fake appends "name|CUDA_VISIBLE_DEVICES|args" to $CALLS. srun stands in for a `ray start --block`.
FAKES = {
    "ray": 'echo "ray|${CUDA_VISIBLE_DEVICES-unset}|$*" >> "$CALLS"',
    "torchrun": 'echo "torchrun|${CUDA_VISIBLE_DEVICES-unset}|$*" >> "$CALLS"; exit "${TORCHRUN_RC:-0}"',
    "srun": 'echo "srun||$*" >> "$CALLS"; [[ -n "${SRUN_DIES:-}" ]] || exec sleep 60',
    "scontrol": 'echo "scontrol||$*" >> "$CALLS"; printf "node0\\nnode1\\nnode2\\n"',
    # Only the scripts' GPU-count query is faked; config validation runs the real interpreter.
    "python": f'if [[ "${{2:-}}" == *cluster_resources* ]]; then echo "$RAY_GPUS"; else exec "{sys.executable}" "$@"; fi',
}


@pytest.fixture
def launch(tmp_path):
    """launch(script, *args, **env) -> (CompletedProcess, [(name, cuda_visible_devices, args), ...])."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.log"

    def run(script, *args, **env):
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "RAY_")) and k not in ("CONFIG", "CUDA_VISIBLE_DEVICES")}
        base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), HEAD_IP="10.0.0.1")
        base.update({k: str(v) for k, v in env.items()})
        calls.write_text("")
        # cwd without a .venv: the scripts activate ./.venv, whose real ray/torchrun would shadow the fakes.
        proc = subprocess.run(["bash", str(ROOT / "launch" / script), *map(str, args)], cwd=tmp_path, env=base,
                              capture_output=True, text=True, timeout=60)
        return proc, [tuple(line.split("|", 2)) for line in calls.read_text().splitlines()]

    return run


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args", [["no/such.yaml", "train.steps=2"], []], ids=["missing", "none"])
@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_bad_config_fails_in_one_line_before_any_cluster_call(launch, script, args):
    proc, calls = launch(script.name, *args)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "config" in proc.stderr, proc.stderr
    assert calls == []


def test_invalid_override_fails_before_ray(launch):
    proc, calls = launch("slurm_1node.sbatch", DEMO, "optim.lr=fast")
    assert proc.returncode != 0 and "optim.lr" in proc.stderr and calls == []


@pytest.mark.parametrize("tp, engines", [(1, 4), (2, 2)])
def test_1node_splits_the_gpus_and_stops_ray(launch, tp, engines):
    proc, calls = launch("slurm_1node.sbatch", DEMO, f"sampler.tensor_parallel_size={tp}", "train.steps=2",
                         SLURM_CPUS_ON_NODE=64)
    assert proc.returncode == 0, proc.stderr
    names = [c[0] for c in calls]
    assert names == ["ray", "torchrun", "ray"]  # head, learner, stop (the trap)
    _, head_gpus, head_args = calls[0]
    assert head_gpus == "4,5,6,7" and "--head" in head_args and "--num-gpus=4" in head_args
    assert "--num-cpus=32" in head_args
    _, learner_gpus, learner_args = calls[1]
    assert learner_gpus == "0,1,2,3" and "--nproc_per_node=4" in learner_args
    # the user's overrides come after the script's, so they win
    assert learner_args.endswith(f"-m rl_lora.cli train {DEMO} sampler.num_engines={engines} "
                                 f"sampler.ray_address=auto sampler.gpu_memory_utilization=0.85 "
                                 f"sampler.tensor_parallel_size={tp} train.steps=2")
    assert calls[2][2].startswith("stop")


def test_1node_custom_split_and_failure_still_stops_ray(launch):
    proc, calls = launch("slurm_1node.sbatch", DEMO, "--resume", "train.steps=2", SAMPLER_GPUS=6, LEARNER_GPUS=2,
                         TORCHRUN_RC=3, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert proc.returncode == 3
    assert calls[0][1] == "2,3,4,5,6,7" and calls[1][1] == "0,1"
    assert "sampler.num_engines=6" in calls[1][2] and calls[-1][2].startswith("stop")
    # argparse takes no positional after an optional: flags are moved behind the overrides
    assert calls[1][2].endswith("train.steps=2 --resume")


def test_multinode_joins_workers_then_trains(launch):
    # 3 nodes x 8 GPUs, learner on 8 GPUs of node 0: 16 sampler GPUs on nodes 1-2.
    proc, calls = launch("slurm_multinode.sbatch", DEMO, SLURM_JOB_NODELIST="node[0-2]", RAY_GPUS=16,
                         SLURM_CPUS_ON_NODE=64)
    assert proc.returncode == 0, proc.stderr
    srun = [c[2] for c in calls if c[0] == "srun"]
    assert len(srun) == 2 and all("--address=10.0.0.1:6379" in s and "--num-gpus=8" in s for s in srun)
    assert sorted(s.split("-w ")[1].split()[0] for s in srun) == ["node1", "node2"]  # started in background: any order
    learner = next(c for c in calls if c[0] == "torchrun")
    assert learner[1] == "0,1,2,3,4,5,6,7" and "sampler.num_engines=16" in learner[2]
    assert calls[-1][0] == "ray" and calls[-1][2].startswith("stop")


@pytest.mark.parametrize("env, message", [({"RAY_GPUS": 8, "RAY_WAIT_S": 0}, "8 of 16"),
                                          ({"RAY_GPUS": 0, "SRUN_DIES": 1}, "exited before joining")])
def test_multinode_fails_clearly_when_workers_do_not_join(launch, env, message):
    proc, calls = launch("slurm_multinode.sbatch", DEMO, SLURM_JOB_NODELIST="node[0-2]", **env)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "torchrun" not in [c[0] for c in calls] and calls[-1][2].startswith("stop")


def test_ray_train_joins_the_cluster_unless_told_otherwise():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        from ray_train import train_argv
    finally:
        sys.path.pop(0)
    assert train_argv(["c.yaml", "x=1"]) == ["train", "c.yaml", "sampler.ray_address=auto", "x=1"]
    assert train_argv(["c.yaml", "--resume", "x=1"]) == ["train", "c.yaml", "sampler.ray_address=auto", "x=1",
                                                          "--resume"]
    assert train_argv(["--help"]) == ["train", "--help"]


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_load_with_the_cluster_overrides(config):
    """Every recipe with the keys the launch scripts add (and async mode, which docs/cluster.md suggests)."""
    cfg = load_config(config, ["sampler.num_engines=4", "sampler.ray_address=auto", "train.max_staleness=1"])
    assert cfg.sampler.num_engines == 4 and cfg.train.max_staleness == 1
