"""The run folder (`train.output_dir`): what counts as an earlier run's results, `--overwrite`, and whether a
checkpoint may be resumed with this config. Reads no model.

- A fresh run (no --resume) refuses a folder holding another run's results (RESULT_MARKERS): it would replace
  the trained adapter and lose the metrics. An empty folder, or one with only other files, is used as it is.
- `--overwrite` destroys nothing: once every check that needs no model has passed, the earlier run's files
  (RUN_FILES) are moved into a new sibling folder `<output_dir>.old-<UTC time>`; the user's other files stay.
- `--resume` compares the checkpoint's signature (model, full vs LoRA, adapter names, rank, alpha, target modules,
  optimizer settings) with this config: a changed adapter shape or model is refused with a one-line diff; changed
  optimizer settings (lr, LoRA+ ratio, betas, weight decay) apply from the next step and are printed (the
  checkpoint's AdamW moments are kept; rl_lora/checkpoint.py: load).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from rl_lora import atomic, checkpoint
from rl_lora.config import Config, ConfigError, adapter_specs, is_full_finetune

# What rl-lora train / sweep write into the run folder (moved aside together by --overwrite).
RUN_FILES = ("checkpoints", "adapter", "adapters", "model", "eval", "metrics.jsonl", "samples.jsonl", "config.yaml",
             "reward_curve.png", "sweep.json", "sweep.md", "wandb")
# Keys of the signature that fix what the checkpoint's tensors mean; changing one on resume is refused.
SHAPE_KEYS = ("model.path", "lora.rank", "adapters", "rank", "alpha", "target_modules", "scalars")


def previous_results(run_dir: Path) -> list[str]:
    """The results of an earlier run in `run_dir` that a fresh run would replace or lose ([] = none)."""
    found = []
    ckpt = run_dir / "checkpoints"
    if (ckpt / "latest").exists() or any(checkpoint.step_of(p) is not None for p in ckpt.glob("step_*")):
        found.append("checkpoints/")
    found += [f"{name}/" for name in ("adapter", "adapters", "model", "eval") if (run_dir / name).exists()]
    if (run_dir / "metrics.jsonl").exists():
        found.append("metrics.jsonl")
    return found


def check_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder this run would take results from (fresh) or cannot resume from; changes nothing."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (--resume continues the run in train.output_dir, "
                          "--overwrite starts a new one there)")
    found = previous_results(run_dir) if run_dir.is_dir() else []
    ways = (f"start over with --overwrite (the earlier files are moved to {run_dir.name}.old-<time>/ beside it) "
            "or choose another train.output_dir")
    if found and not resume and not overwrite:
        raise ConfigError(f"train.output_dir: {run_dir} holds another run's results ({', '.join(found)}); continue "
                          f"that run with --resume, {ways}")
    if resume:
        problem = checkpoint.pointer_problem(run_dir)
        if problem:
            raise ConfigError(f"--resume: {problem}; {ways}")
        if checkpoint.latest(run_dir) is None and set(found) - {"metrics.jsonl"}:
            raise ConfigError(f"--resume: {run_dir} holds another run's results ({', '.join(found)}) but no "
                              f"checkpoint to continue from; {ways}")


def move_aside(run_dir: Path) -> Path | None:
    """--overwrite: move the earlier run's files into a new sibling `<name>.old-<UTC time>`; None if there were
    none. A rename on the same disk: nothing is copied or deleted. If a move fails, the moved files go back."""
    if not previous_results(run_dir):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = run_dir.resolve()
    dest = base.with_name(f"{base.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}.old-{stamp}-{n}")
    moved = []
    try:
        dest.mkdir()
        for name in RUN_FILES:
            if (run_dir / name).exists() or (run_dir / name).is_symlink():
                os.rename(run_dir / name, dest / name)
                moved.append(name)
        for entry in (dest, run_dir, dest.parent):
            atomic.fsync_path(entry)
    except OSError as exc:
        for name in moved:
            os.rename(dest / name, run_dir / name)
        raise ConfigError(f"--overwrite: cannot move the earlier run in {run_dir} to {dest} ({exc.strerror}); "
                          "choose another train.output_dir") from None
    return dest


def run_signature(cfg: Config) -> dict:
    """What a checkpoint of this config is: flat `key: value` pairs named as the user sets them (K = 1:
    `lora.rank`, `optim.lr`; K > 1: `adapters[<name>].rank`). `cfg` has `lr: auto` resolved."""
    specs = adapter_specs(cfg)
    sig = {"model.path": cfg.model.path, "optim.beta1": cfg.optim.beta1, "optim.beta2": cfg.optim.beta2,
           "optim.weight_decay": cfg.optim.weight_decay}
    if is_full_finetune(cfg):
        return {**sig, "lora.rank": "full", "optim.lr": cfg.optim.lr}
    sig["adapters"] = [s.name for s in specs]
    for s in specs:
        pre = "lora." if not cfg.adapters else f"adapters[{s.name}]."
        sig.update({f"{pre}rank": s.rank, f"{pre}alpha": s.alpha, f"{pre}target_modules": sorted(s.target_modules),
                    ("optim.lr" if not cfg.adapters else f"{pre}lr"): s.lr,
                    f"{pre}lora_plus_ratio": s.lora_plus_ratio})
        if s.scalars is not None:  # a sub-rank-1 adapter (rl_lora/learner/tinylora.py); plain LoRA signatures stay as they were
            sig[f"{pre}scalars"] = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(s.scalars).items())
    return sig


def signature_from_files(path: Path) -> dict:
    """A checkpoint written before signatures were stored: its adapter shapes from its PEFT adapter_config.json
    files (the optimizer settings it had are unknown: only shape keys are compared)."""
    dirs = sorted((path / "adapters").iterdir()) if (path / "adapters").is_dir() else [path / "adapter"]
    dirs = [d for d in dirs if (d / "adapter_config.json").is_file()]
    if not dirs:
        return {"lora.rank": "full"}
    sig = {"adapters": [d.name for d in dirs] if len(dirs) > 1 else ["adapter"]}
    for d in dirs:
        peft = json.loads((d / "adapter_config.json").read_text())
        pre = "lora." if len(dirs) == 1 else f"adapters[{d.name}]."
        sig.update({f"{pre}rank": peft["r"], f"{pre}alpha": float(peft["lora_alpha"]),
                    f"{pre}target_modules": sorted(peft["target_modules"])})
    return sig


def _same(key: str, old, new) -> bool:
    if key == "model.path" and old != new:
        return Path(str(old)).expanduser().resolve() == Path(str(new)).expanduser().resolve()
    return old == new


def _value(sig: dict, key: str) -> str:
    if key not in sig:
        return "(none)"
    v = sig[key]
    if isinstance(v, list):
        return ",".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _show(sig: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={_value(sig, k)}" for k in keys)


def check_resume(cfg: Config, start: Path, n_datasets: int) -> list[str]:
    """Refuse to resume `start` with a different model or adapter shape (one line with the diff); return lines
    naming the optimizer settings that change (applied from the next step by checkpoint.load)."""
    state = json.loads((start / "state.json").read_text())
    stored = checkpoint.signature(start)
    old = stored if stored is not None else signature_from_files(start)
    new = run_signature(cfg)
    keys = list(dict.fromkeys(list(old) + list(new))) if stored is not None else [k for k in old]
    if stored is None and len(old.get("adapters", [])) > 1:
        new = {**new, "adapters": sorted(new["adapters"])}  # directory order: the names, not their order
    changed = [k for k in keys if not _same(k, old.get(k), new.get(k))]
    shape = [k for k in changed if k in SHAPE_KEYS or k.rsplit(".", 1)[-1] in SHAPE_KEYS]
    if "full" in (old.get("lora.rank"), new.get("lora.rank")) and "lora.rank" in shape:
        shape = ["lora.rank"]  # full fine-tuning vs adapters: the rest of the diff says nothing more
    if shape:
        raise ConfigError(f"--resume: {start.name} was trained with {_show(old, shape)}; this config has "
                          f"{_show(new, shape)} (the model and the adapters' shape cannot change in a run: set them "
                          f"back, or start a new run with --overwrite or another train.output_dir)")
    positions = state["data_position"] if isinstance(state["data_position"], list) else [state["data_position"]]
    if len(positions) != n_datasets:
        raise ConfigError(f"--resume: the checkpoint has {len(positions)} data streams, this config has "
                          f"{n_datasets} datasets (adapters' own `data` changed?)")
    if cfg.train.steps < state["step"]:
        raise ConfigError(f"train.steps: {cfg.train.steps} is below the checkpoint's step ({state['step']}, "
                          f"{start}); set train.steps >= {state['step']} to continue")
    notes = []
    if changed:
        notes.append(f"--resume: optimizer settings changed since {start.name}, the new ones apply from step "
                     f"{state['step'] + 1} (AdamW moments kept): "
                     + "; ".join(f"{k} {_value(old, k)} -> {_value(new, k)}" for k in changed))
    elif stored is None:
        notes.append(f"--resume: {start.name} predates stored optimizer settings; this config's lr, betas and weight "
                     "decay apply from the next step")
    return notes
