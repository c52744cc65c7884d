"""Atomic checkpoints: adapters (PEFT files, one directory each), optimizer state, step, data position, RNG.

Each checkpoint is written into a hidden temp directory, fsynced, then renamed to `step_NNNNNN` in one
`os.replace`; the `latest` pointer is replaced the same way. A process killed mid-write leaves only a
`.tmp-*` directory, which is never read (and is cleaned up by the next save). Resume reads `latest`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import torch

from rl_lora import faults

KEEP = 2  # complete checkpoints kept on disk


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save(run_dir: Path, step: int, learner, state: dict) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=root))
    for k in range(0 if learner.full_finetune else learner.num_adapters):
        learner.write_adapter(tmp / learner.adapter_dirname(k), k)
    if faults.fire("kill_in_checkpoint", step):  # tests/faults: die with the checkpoint half-written
        os.kill(os.getpid(), signal.SIGKILL)
    payload = {"optimizers": learner.optimizer_states(), "torch_rng": torch.get_rng_state(),
               "python_rng": random.getstate()}
    if learner.full_finetune:
        payload["model"] = learner.model.state_dict()
    torch.save(payload, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    _fsync_dir(tmp)
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / "latest")
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load(path: Path, learner) -> dict:
    """Restore adapter + optimizer (+ RNG) into `learner`; returns the saved state dict (step, positions)."""
    state = json.loads((path / "state.json").read_text())
    payload = torch.load(path / "trainer_state.pt", weights_only=False)
    if learner.full_finetune:
        learner.model.load_state_dict(payload["model"])
    else:
        for k in range(learner.num_adapters):
            if not (path / learner.adapter_dirname(k)).is_dir():
                raise ValueError(f"checkpoint {path} has no {learner.adapter_dirname(k)}/ (a different adapter list?)")
            learner.load_adapter(path / learner.adapter_dirname(k), k)
    learner.load_optimizer_states(payload["optimizers"])
    torch.set_rng_state(payload["torch_rng"])
    random.setstate(payload["python_rng"])
    return state
