"""c. Batch size at a fixed number of episodes (64 prompts x 8 samples in all), LoRA vs full fine-tuning at one LR
each: one grid per batch size (prompts_per_step is a run setting); batch 8 (8 steps) is the shared cells' setting
(experiments/cells/), read from there at the same LRs.  python experiments/c_batch/run.py [--smoke] [--read-only]"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import yaml
from page import (ROOT, SMOKE, at_lrs, best, committed, grid_command, parse_args, run_cells, run_grid, summary,
                  write_page)

from rl_lora.grid import expand
from rl_lora.grid_summary import select

HERE = Path(__file__).resolve().parent
PROMPTS_IN_ALL = 64
BATCHES = (2, 8, 32)  # prompts per step; steps = 64 / batch
SHARED = 8  # the batch of experiments/cells/: read from there
VARIANTS = ("rank1", "full")


def plot(sections: list, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in VARIANTS:
        pts = [(r["prompts_per_step"], best(r, v)) for _, r in sections if best(r, v)]
        err = [[p["mean"] - p["ci95"][0] if p["ci95"] else 0 for _, p in pts],
               [p["ci95"][1] - p["mean"] if p["ci95"] else 0 for _, p in pts]]
        ax.errorbar([b for b, _ in pts], [p["mean"] for _, p in pts], yerr=err, marker="o", capsize=3, label=v)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"prompts per step (x8 samples), {PROMPTS_IN_ALL} prompts in all")
    ax.set_ylabel("held-out accuracy at the best LR")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finding(sections: list) -> str:
    parts = []
    for v in VARIANTS:
        pts = [(r["prompts_per_step"], best(r, v)) for _, r in sections if best(r, v)]
        parts.append(f"{v}: " + ", ".join(f"batch {b} {p['mean']:.3f} (LR {p['lr']:g})" for b, p in pts))
    drop = {v: best(sections[0][1], v)["mean"] - best(sections[-1][1], v)["mean"]
            for v in VARIANTS if best(sections[0][1], v) and best(sections[-1][1], v)}
    return ("Best cell per batch size: " + "; ".join(parts) + ". From the smallest to the largest batch, accuracy "
            "changes by " + ", ".join(f"{v} {-d:+.3f}" for v, d in drop.items()) + ". The paper: LoRA loses more than "
            "full fine-tuning at large batches, whatever the rank; a difference smaller than the intervals above is "
            "not evidence either way.")


GRIDS = {"": HERE / "grid.yaml", "-full": HERE / "grid-full.yaml"}  # committed as results/batch<b><suffix>.json


def train_batch(b: int, steps: int, args) -> tuple[list[dict], float, list[list[str]]]:
    """Batch `b`'s summaries, one per grid of GRIDS (trained unless committed for the same cells and steps)."""
    results, seconds, cmds = [], 0.0, []
    for suffix, grid_file in GRIDS.items():
        out = ROOT / "runs" / ("experiments-smoke" if args.smoke else "experiments") / "c_batch" / f"batch{b}{suffix}"
        over = [*args.overrides, f"train.prompts_per_step={b}", f"train.steps={steps}"]
        g = expand(str(grid_file), [*over, *(SMOKE if args.smoke else [])])
        keep_at = None if args.smoke or args.overrides else committed(grid_file, f"batch{b}{suffix}")
        r = summary({(c.variant, c.lr, c.seed) for c in g.cells}, steps, out, keep_at, args.read_only, args.retrain,
                    lambda: run_grid(HERE, [*over, f"train.output_dir={out}"], args.smoke, name=f"batch{b}{suffix}",
                                     grid_file=grid_file)[0])
        if r is None:
            print(f"batch {b}: {grid_file.name} not trained yet (--read-only)")
            continue
        results.append(r)
        seconds += sum(r.get("run_time_s", {}).values())
        cmds.append(grid_command(grid_file, over))
    return results, seconds, cmds


if __name__ == "__main__":
    args = parse_args()
    lrs: dict[str, list[float]] = {}
    for grid_file in GRIDS.values():
        grid = yaml.safe_load(grid_file.read_text())["grid"]
        for v in grid["variants"]:
            lrs[v["name"]] = sorted({*lrs.get(v["name"], []), *v.get("lrs", grid["lrs"])})
    sections, seconds, cmds = [], 0.0, []
    for b in BATCHES:
        steps = 2 if args.smoke else PROMPTS_IN_ALL // b
        if b == SHARED:
            r, s, cmd = run_cells({v: v for v in VARIANTS}, args.overrides, args.smoke, args.read_only, args.retrain)
            r, cmd = at_lrs(r, lrs), cmd
        else:
            found, s, cmd = train_batch(b, steps, args)
            if not found:
                continue
            r = select(found, {v: v for v in VARIANTS})
        sections.append((f"batch {b} prompts x {steps} steps", r))
        seconds += s
        cmds += cmd
    png = plot(sections, ROOT / "runs" / "experiments" / "c_batch" / "batch.png")
    write_page(HERE, "c. Batch size at a fixed number of episodes, LoRA vs full fine-tuning",
               f"At {PROMPTS_IN_ALL} prompts x 8 samples in all, how does held-out accuracy depend on the prompts per "
               f"step, for rank-1 LoRA (LR {', '.join(f'{x:g}' for x in lrs['rank1'])}) and for full fine-tuning "
               f"(LR {', '.join(f'{x:g}' for x in lrs['full'])}), each at its best of those LRs?",
               "LoRA tolerates large batches worse than full fine-tuning, independent of rank.", sections,
               finding(sections), seconds, cmds, args.smoke, plot_file=png)
