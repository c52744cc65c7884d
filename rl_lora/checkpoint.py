"""Atomic checkpoints: adapters (PEFT files, one directory each), optimizer state, step, data position, RNG.

Each checkpoint is written into a hidden temp directory, every file and directory in it fsynced, then renamed to
`step_NNNNNN` in one `os.replace` and the rename made durable (fsync of `checkpoints/`); only then is the `latest`
pointer replaced the same way (and `checkpoints/` fsynced again), so `latest` always names a complete checkpoint.
A process killed mid-write leaves only a `.tmp-*` directory, which is never read (and is cleaned up by the next
save). Resume reads `latest`.

Pruning keeps the KEEP newest checkpoints *of this run* by step number (the run id in each state.json; a resumed
run keeps its id) and never removes the one just written: checkpoints of another run in the folder are never
touched. `state.json` also records the run's `signature` (model, adapter shapes, optimizer settings), which
`--resume` compares with the new config (rl_lora/train.py: check_resume).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import uuid
from pathlib import Path

import torch

from rl_lora import atomic, faults

KEEP = 2  # complete checkpoints kept on disk
STEP_DIR = re.compile(r"step_(\d+)")
# Optimizer settings taken from the config, not from the checkpoint, on resume (see load).
OPTIMIZER_KEYS = ("lr", "betas", "weight_decay")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def step_of(path: Path) -> int | None:
    m = STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _is_complete(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "trainer_state.pt").is_file()


def _run_id(path: Path) -> str | None:
    try:
        return json.loads((path / "state.json").read_text()).get("run_id", "")
    except (OSError, ValueError):
        return None  # unreadable: not provably ours, never pruned


def save(run_dir: Path, step: int, policy, state: dict) -> Path:
    """Write checkpoint `step` of `policy` (rl_lora/policy.py: its weights and its learner's optimizers). `state`
    holds the run's `run_id` (see prune), data position, version, signature."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        root.mkdir(parents=True)
        atomic.fsync_path(run_dir)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)

    def fill(tmp: Path) -> None:
        weights = policy.save_checkpoint(tmp)  # adapters' PEFT directories, or the model's state dict
        if faults.fire("kill_in_checkpoint", step):  # tests/faults: die with the checkpoint half-written
            os.kill(os.getpid(), signal.SIGKILL)
        payload = {"optimizers": policy.learner.optimizer_states(), "torch_rng": torch.get_rng_state(),
                   "python_rng": random.getstate(), **weights}
        torch.save(payload, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))

    # an existing step_N (a step redone after a kill between its rename and the pointer: `latest` names an older
    # one) is replaced
    final = atomic.write_dir(root / f"step_{step:06d}", fill, prefix=f".tmp-step_{step:06d}-")
    atomic.write_text(root / "latest", final.name)
    prune(root, final, state.get("run_id", ""))
    return final


def prune(root: Path, keep_newest: Path, run_id: str) -> None:
    """Remove this run's checkpoints older than the KEEP newest by step number (`keep_newest`, just written, is
    one of them). Other runs' checkpoints and later steps (not ours to judge) stay."""
    step = step_of(keep_newest)
    ours = sorted((s, p) for p in root.glob("step_*") if p.is_dir() and p != keep_newest
                  and (s := step_of(p)) is not None and s < step and _run_id(p) == run_id)
    for _, old in ours[:max(0, len(ours) - (KEEP - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-replaced-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else None (see pointer_problem for why not)."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if _is_complete(path) else None


def pointer_problem(run_dir: Path) -> str | None:
    """Why `latest` cannot be resumed from although the folder holds checkpoints, or None (no pointer and no
    checkpoints, or a good pointer)."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    steps = sorted(p.name for p in root.glob("step_*") if p.is_dir() and _is_complete(p)) if root.is_dir() else []
    found = f"complete checkpoints there: {', '.join(steps)}" if steps else "no complete checkpoint there"
    if not pointer.is_file():
        return f"{root} has no `latest` pointer ({found})" if steps else None
    name = pointer.read_text().strip()
    if latest(run_dir) is None:
        return f"{pointer} names {name!r}, which is missing or incomplete ({found})"
    return None


def signature(path: Path) -> dict | None:
    """The run signature stored with a checkpoint, or None (a checkpoint written before signatures existed)."""
    return json.loads((path / "state.json").read_text()).get("signature")


def load(path: Path, policy) -> dict:
    """Restore `policy`'s weights and its learner's optimizers (+ RNG); returns the saved state dict (step, positions).

    The optimizer moments and step counts come from the checkpoint; its settings (OPTIMIZER_KEYS: lr, betas,
    weight decay, per parameter group, so LoRA+ ratios too) are those the learner was built with from the current
    config: torch's load_state_dict would otherwise silently bring back the checkpoint's."""
    state = json.loads((path / "state.json").read_text())
    payload = torch.load(path / "trainer_state.pt", weights_only=False)
    policy.load_checkpoint(path, payload)
    learner = policy.learner
    configured = [[{key: g[key] for key in OPTIMIZER_KEYS if key in g} for g in opt.param_groups]
                  for opt in learner.optimizers]
    learner.load_optimizer_states(payload["optimizers"])
    for opt, groups in zip(learner.optimizers, configured):
        for group, settings in zip(opt.param_groups, groups):
            group.update(settings)
    torch.set_rng_state(payload["torch_rng"])
    random.setstate(payload["python_rng"])
    return state
