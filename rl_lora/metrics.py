"""Per-step metrics: terminal line, metrics.jsonl (append-only, survives resume), optional wandb, a PNG."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rl_lora import atomic


class MetricsLogger:
    def __init__(self, run_dir: Path, wandb_project: str = "", config: dict | None = None,
                 resume_step: int | None = None):
        """resume_step: the checkpoint step a resumed run continues from. Rows logged after it (steps that were
        in flight when the process died) are dropped, so no step appears twice. None = a fresh run."""
        self.path = run_dir / "metrics.jsonl"
        resume = resume_step is not None
        for path in (self.path, run_dir / "samples.jsonl"):
            if not resume:
                path.unlink(missing_ok=True)
            elif path.exists():
                _truncate_after(path, resume_step)
        self._wandb = None
        if wandb_project:
            try:
                import wandb

                # Offline unless the user configured wandb (WANDB_MODE or an API key / login).
                mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
                self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config or {}, mode=mode,
                                         resume="allow" if resume else None)
            except Exception as exc:  # metrics must never stop a run
                print(f"wandb disabled: {type(exc).__name__}: {exc}")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[tuple[str, str, float]]) -> None:
        """A few (prompt, completion, reward) triples per step in samples.jsonl: read them when a curve looks odd."""
        with (self.path.parent / "samples.jsonl").open("a") as f:
            for prompt, completion, reward in rows:
                f.write(json.dumps({"step": step, "prompt": prompt, "completion": completion, "reward": reward}) + "\n")

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the rows of steps <= step (and any partial last line is dropped); atomic replace."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by a kill
    atomic.write_text(path, "".join(x + "\n" for x in keep))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_step(step: int, m: dict) -> str:
    learned = (f"rho {m['is/ratio_mean']:.4f} max {m.get('is/ratio_max', 0):.3f} "
               f"kl {m.get('is/kl_sampler_learner', 0):.2e} | loss {m.get('loss/pg', 0):+.4f} "
               f"gn {m.get('loss/grad_norm', 0):.3f}") if "is/ratio_mean" in m else "no update: no group had signal"
    line = (f"step {step:4d} | reward {m.get('reward/mean', 0):.3f} acc {m.get('reward/accuracy', 0):.3f} "
            f"len {m.get('response/length_mean', 0):5.1f} | {learned} | "
            f"groups {int(m.get('groups/kept', 0))}/{int(m.get('groups/total', 0))} | "
            f"t sample {m.get('time/sample', 0):.1f}s score {m.get('time/score', 0):.1f}s "
            f"learn {m.get('time/learn', 0):.1f}s push {1000 * m.get('time/push', 0):.0f}ms "
            f"check {1000 * m.get('time/push_check', 0):.0f}ms")
    per = adapter_names(m)
    if per:
        line += " | " + " ".join(f"{n} {m[f'{n}/reward/mean']:.3f}" for n in per)
    return line


def adapter_names(m: dict) -> list[str]:
    """Names of the adapters with per-adapter metrics in `m` (K > 1 runs), in logged order."""
    return [k[: -len("/reward/mean")] for k in m if k.endswith("/reward/mean") and k != "reward/mean"]


def plot_rewards(run_dir: Path) -> Path | None:
    """reward_curve.png: the train reward and held-out accuracy along the run; with K adapters, one colour per
    adapter (train reward solid, held-out accuracy dots) and the base model's held-out accuracy as a line."""
    rows = read_metrics(run_dir)

    def series(key: str) -> list:
        return [(r["step"], r[key]) for r in rows if key in r]

    names = next((adapter_names(r) for r in rows if adapter_names(r)), [])
    lines, hlines = [], []  # (points, line format, matplotlib style, label); (y, style, label)
    if names:
        for i, name in enumerate(names):
            lines.append((series(f"{name}/reward/mean"), "-", dict(color=f"C{i % 10}"), f"{name} train reward"))
            lines.append((series(f"{name}/eval/accuracy"), "o--", dict(color=f"C{i % 10}", alpha=0.8),
                          f"{name} held-out"))
        base = series("eval/base_accuracy")
        if base:
            hlines.append((base[-1][1], dict(color="grey", ls=":"), "base held-out"))
        title, size = f"{run_dir.name}: {len(names)} adapters on one base", (7, 4)
        legend = dict(loc="upper left", fontsize=7, ncol=2)
    else:
        lines.append((series("reward/mean"), "-", dict(color="tab:blue"), "train reward (mean)"))
        lines.append((series("eval/accuracy"), "o-", dict(color="tab:orange"), "held-out accuracy"))
        title, size, legend = run_dir.name, (6, 3.5), dict(loc="lower right")
    lines = [line for line in lines if line[0]]
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for points, fmt, style, label in lines:
        ax.plot(*zip(*points), fmt, label=label, **style)
    for y, style, label in hlines:
        ax.axhline(y, label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    ax.set_title(title)
    fig.tight_layout()
    out = run_dir / "reward_curve.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
