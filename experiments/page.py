"""Shared by the experiments' run.py scripts: run a question's grid (`rl-lora grid`), then write its page into the
question's folder: results.json (the grid summary + the compute it took), plot.png and README.md, which ends with
the script's one-paragraph finding.

    python experiments/<question>/run.py            # the full experiment (hours: see experiments/README.md)
    python experiments/<question>/run.py --smoke    # 2 steps, 1 seed, into runs/experiments-smoke/: proves the
                                                    # pipeline in minutes and writes its page there, not here

Every grid's summary (its grid.json) is committed beside the grid file, under results/, when it is trained: a page
is rebuilt from a fresh clone without training (`--read-only`), and a grid is trained again only with `--retrain`
(or when its cells or steps changed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl_lora.config import config_from_data  # noqa: E402
from rl_lora.grid import expand  # noqa: E402
from rl_lora.grid_summary import format_markdown, plot, select  # noqa: E402

SMOKE = ["train.steps=2", "grid.seeds=[0]", "train.eval_every=0"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, outputs under runs/experiments-smoke/")
    ap.add_argument("--read-only", action="store_true", help="train nothing: write the page from the grids already "
                    "trained (variants of a grid not trained yet are reported as missing)")
    ap.add_argument("--retrain", action="store_true", help="train every grid the question reads again, even where "
                    "a summary of the same cells is committed (the earlier run folder is moved aside, never deleted)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every grid, e.g. train.steps=8")
    return ap.parse_args()


def grid_command(grid_file: Path, args: list[str]) -> list[str]:
    """The grid command as a user types it (the pages list it; run_grid runs it through this interpreter)."""
    return ["rl-lora", "grid", str(grid_file.relative_to(ROOT)), *args]


def run_grid(question: Path, overrides: list[str], smoke: bool, name: str = "", grid_file: Path | None = None,
             out: Path | None = None) -> tuple[dict, float, list[str]]:
    """Train a grid (the question's grid.yaml unless `grid_file`; `--overwrite`: an earlier run is moved aside, never
    deleted); its summary, the wall time, and the command."""
    grid_file = grid_file or question / "grid.yaml"
    out = out or _absolute(expand(str(grid_file), overrides).dir)
    if smoke:
        out = ROOT / "runs" / "experiments-smoke" / question.name / name
    overrides = [*overrides, *(SMOKE if smoke else []), f"train.output_dir={out}"]
    cmd = grid_command(grid_file, [*overrides, "--overwrite", "--quiet"])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rl_lora.cli", *cmd[1:]], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads((out / "grid.json").read_text()), time.perf_counter() - t0, cmd


CELLS = ROOT / "experiments" / "cells"
CELL_GRIDS = ("rank1", "rank1-low", "rank1-lower", "rank1-lowest", "full", "full-low", "full-lower", "higher", "higher-edge")  # experiments/cells/<name>.yaml


def committed(grid_file: Path, name: str = "") -> Path:
    """Where the summary of a trained grid is committed: results/<name>.json beside the grid file."""
    return grid_file.parent / "results" / f"{name or grid_file.stem}.json"


def trained(want: set, steps: int, *candidates: Path) -> dict | None:
    """The first of the summaries `candidates` (a run folder's grid.json, the committed copy) that holds exactly
    the cells `want` ((variant, LR, seed)) after `steps` steps; None when none does."""
    for path in candidates:
        if path.is_file():
            r = json.loads(path.read_text())
            if {(c["variant"], c["lr"], c["seed"]) for c in r["cells"]} == want and r["steps"] == steps:
                return r
    return None


def summary(want: set, steps: int, out: Path, keep_at: Path | None, read_only: bool, retrain: bool,
            train) -> dict | None:
    """A grid's summary: read from its run folder `out` or its committed copy `keep_at` where one holds the cells
    `want` after `steps` steps (unless `retrain`), else from `train()` (None with `read_only`); a summary that
    differs from the committed copy is committed."""
    r = None if retrain else trained(want, steps, out / "grid.json", *([keep_at] if keep_at else []))
    if r is None and read_only:
        return None
    if r is None:
        r = train()
    if keep_at and (not keep_at.is_file() or json.loads(keep_at.read_text()) != r):
        keep_at.parent.mkdir(parents=True, exist_ok=True)
        keep_at.write_text(json.dumps(r, indent=1))
    return r


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else ROOT / path


def run_cells(names: dict[str, str], overrides: list[str], smoke: bool, read_only: bool = False,
              retrain: bool = False) -> tuple[dict, float, list[list[str]]]:
    """The question's variants (grid name -> the question's name) from the grids shared by a, b, d and e
    (experiments/cells/): each grid holding one of them is trained, unless its summary is there for the same cells
    and steps, in its run folder or committed (the first question to run trains it, the others read it); then the
    variants' cells of every such grid are summarised together, renamed. Returns the summary, the compute the grids
    took (shared between the questions) and the commands."""
    results, seconds, cmds = [], 0.0, []
    for grid_name in CELL_GRIDS:
        grid_file = CELLS / f"{grid_name}.yaml"
        g = expand(str(grid_file), [*overrides, *(SMOKE if smoke else [])])
        if not any(v.name in names for v in g.variants):
            continue
        out = ROOT / "runs" / "experiments-smoke" / "cells" / grid_name if smoke else _absolute(g.dir)
        want = {(c.variant, c.lr, c.seed) for c in g.cells}
        steps = config_from_data(next(iter(g.runs.values()))).train.steps
        keep_at = None if smoke or overrides else committed(grid_file)  # only the grid as committed is committed
        cmd = grid_command(grid_file, overrides)
        r = summary(want, steps, out, keep_at, read_only, retrain,
                    lambda: run_grid(CELLS, [*overrides, *(SMOKE if smoke else [])], False, grid_file=grid_file,
                                     out=out)[0])
        if r is None:
            print(f"{grid_file.relative_to(ROOT)}: not trained yet (--read-only): its variants are missing")
            continue
        seconds += sum(r.get("run_time_s", {}).values())
        cmds.append(cmd)
        results.append(r)
    if not results:
        raise SystemExit("none of the grids this question reads is trained yet")
    return select(results, names), seconds, cmds


def at_lrs(r: dict, lrs: dict[str, list[float]]) -> dict:
    """The summary `r` restricted to some LRs per variant (variant -> LRs), each variant's LRs those."""
    cells = [c for c in r["cells"] if c["lr"] in lrs.get(c["variant"], ())]
    variants = {v: {**s, "lrs": [x for x in s["lrs"] if x in lrs[v]]} for v, s in r["variants"].items() if v in lrs}
    return select([{**r, "cells": cells, "variants": variants}], {v: v for v in lrs})


def setup_line(r: dict) -> str:
    return (f"{r['model']} ({r.get('model_type')}, hidden {r.get('hidden_size')}), data `{r['data']}`, {r['steps']} "
            f"steps x {r['prompts_per_step']} prompts x {r['samples_per_prompt']} samples; held-out "
            f"{r['eval_problems']} problems x {r['eval_samples']} samples; seeds {r['seeds']}")


def write_page(question: Path, title: str, asks: str, paper: str, sections: list[tuple[str, dict]],
               finding: str, compute_s: float, commands: list[list[str]], smoke: bool, extra: dict | None = None,
               plot_file: Path | None = None) -> Path:
    """results.json + plot.png + README.md for the question (under runs/experiments-smoke/ with --smoke)."""
    dest = ROOT / "runs" / "experiments-smoke" / question.name if smoke else question
    dest.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    first = sections[0][1]
    results = {**first, "sections": {k: v for k, v in sections} if len(sections) > 1 else None,
               "compute_s": round(compute_s), "date": stamp, "machine": machine, "smoke": smoke,
               "commands": [" ".join(c) for c in commands], **(extra or {})}
    (dest / "results.json").write_text(json.dumps(results, indent=1))
    if plot_file or first.get("dir"):
        shutil.copy(plot_file or Path(first["dir"]) / "grid.png", dest / "plot.png")
    else:  # a summary selected from the shared grids
        plot(first, dest / "plot.png")
    lines = [f"# {title}", "", f"**Question.** {asks}", "", f"**The paper.** {paper}", "",
             f"**Setup.** {setup_line(first)}. 95% intervals: {first['interval']}.", "",
             f"**Compute.** {compute_s / 60:.0f} min wall on {machine} ({stamp}"
             + (", SMOKE RUN: 2 steps, 1 seed, not a result" if smoke else "") + ").", "",
             "```", *(" ".join(c) for c in commands), "```", "", "![held-out accuracy vs LR](plot.png)", ""]
    for name, r in sections:
        lines += ([f"## {name}", ""] if name else []) + [format_markdown(r), ""]
    lines += ["## Finding", "", finding, ""]
    (dest / "README.md").write_text("\n".join(lines))
    print(f"page: {dest / 'README.md'}")
    return dest


def best(r: dict, variant: str) -> dict | None:
    return r["best"].get(variant)


def fmt_best(r: dict, variant: str) -> str:
    b = best(r, variant)
    if b is None:
        return f"{variant}: no result"
    ci = f" [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]" if b["ci95"] else ""
    if "tied" in b:  # every listed LR scored the same: no optimum to name
        return f"{variant} {b['mean']:.3f}{ci} at LRs {', '.join(f'{lr:g}' for lr in b['tied'])} (a tie)"
    return f"{variant} {b['mean']:.3f}{ci} at LR {b['lr']:g}"


def overlap(r: dict, a: str, b: str) -> bool | None:
    """Do the best cells of variants a and b overlap (95% intervals)? None without intervals."""
    x, y = best(r, a), best(r, b)
    if not (x and y and x["ci95"] and y["ci95"]):
        return None
    return x["ci95"][0] <= y["ci95"][1] and y["ci95"][0] <= x["ci95"][1]


def relation(r: dict, a: str, b: str) -> str:
    """'overlap' / 'are separated' for the best cells of a and b, or 'not measured' where one has no interval."""
    o = overlap(r, a, b)
    return "not measured" if o is None else ("overlap" if o else "are separated")


def edge_note(r: dict, variant: str) -> str:
    """A best LR at the end of its sweep is a bound, not an optimum: say so."""
    b = best(r, variant)
    if b is None or "tied" in b:  # not trained (yet), or no best LR to place
        return ""
    lrs = r["variants"][variant]["lrs"]
    if b["lr"] in (min(lrs), max(lrs)) and len(lrs) > 1:
        return f" ({variant}'s best LR is at the {'low' if b['lr'] == min(lrs) else 'high'} end of its sweep: the " \
               "optimum may lie beyond it)"
    return ""
