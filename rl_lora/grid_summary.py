"""The grid's summary: seeds grouped per (variant, LR), the paper's plot, the best LR per variant. Pure math on
the cells' final held-out accuracies (rl_lora/grid.py reads them from the runs); no model.

Interval: a Student-t 95% interval over seeds, mean +- t(0.975, n-1) * sd / sqrt(n), with sd the sample standard
deviation of the per-seed held-out accuracies. With 3-5 seeds a bootstrap over seeds would be too narrow (it can
only resample the few values seen); the t-interval is the standard small-sample choice. One seed: no interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# t(0.975, df) for df = 1..30 (standard tables); beyond 30, the Cornish-Fisher expansion below is within 1e-3.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("t975: df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: list[float]) -> tuple[float, list[float] | None, float | None]:
    """(mean, 95% t-interval or None for one value, sample sd or None)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half], sd


def group_cells(cells: list[dict]) -> list[dict]:
    """Per (variant, LR), variants in the cells' order and each one's LRs ascending (cells of several grids may
    come in any order): the seeds with a result, their accuracies, mean, interval, sd, and
    the mean accuracy among answered samples."""
    groups = {}
    for c in cells:
        groups.setdefault((c["variant"], c["lr"]), []).append(c)
    order = {v: i for i, v in enumerate(dict.fromkeys(c["variant"] for c in cells))}
    out = []
    for (variant, lr), cs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        done = [c for c in cs if c["accuracy"] is not None]
        row = {"variant": variant, "lr": lr, "seeds": [c["seed"] for c in done],
               "accuracy_per_seed": [c["accuracy"] for c in done], "missing_seeds": [c["seed"] for c in cs
                                                                                     if c["accuracy"] is None]}
        if done:
            row["mean"], row["ci95"], row["sd"] = mean_ci(row["accuracy_per_seed"])
            given = [c["accuracy_given_answer"] for c in done if c.get("accuracy_given_answer") is not None]
            row["mean_given_answer"] = sum(given) / len(given) if given else None
        out.append(row)
    return out


def best_per_variant(groups: list[dict]) -> dict:
    """Per variant, the LR with the highest mean held-out accuracy over seeds, and whether the runner-up LR's
    interval overlaps it (then the optimum is not resolved by these seeds)."""
    best = {}
    for variant in dict.fromkeys(g["variant"] for g in groups):
        ranked = sorted((g for g in groups if g["variant"] == variant and "mean" in g), key=lambda g: -g["mean"])
        if not ranked:
            continue
        top = ranked[0]
        entry = {"lr": top["lr"], "mean": top["mean"], "ci95": top["ci95"], "seeds": len(top["seeds"])}
        tied = [g["lr"] for g in ranked if math.isclose(g["mean"], top["mean"], rel_tol=0, abs_tol=1e-12)]
        if len(tied) > 1:  # e.g. every LR at 0: no LR is best, and no LR ratio can be read from it
            entry["tied"] = sorted(tied)
        if len(ranked) > 1:
            second = ranked[1]
            entry["runner_up_lr"] = second["lr"]
            entry["resolved"] = bool(top["ci95"] and second["ci95"] and top["ci95"][0] > second["ci95"][1])
        best[variant] = entry
    return best


def summarise(cells: list[dict], base: dict | None, meta: dict) -> dict:
    """grid.json's content: the cells, the groups, the best LR per variant, the LR ratio of each LoRA variant's
    optimum to full fine-tuning's (the paper: ~10x, ~15x under 100 steps) where the grid has a `full` variant, and
    whether the variants' best cells overlap."""
    groups = group_cells(cells)
    best = best_per_variant(groups)
    full = [v for v in meta.get("full_variants", []) if v in best]
    ref = best[full[0]] if full and "tied" not in best[full[0]] else None  # a tie names no LR to divide by
    ratio = {v: b["lr"] / ref["lr"] for v, b in best.items() if ref and v not in full and "tied" not in b}
    intervals = [b["ci95"] for b in best.values() if b["ci95"]]
    overlap = (max(lo for lo, _ in intervals) <= min(hi for _, hi in intervals)) if len(intervals) >= 2 else None
    return {**meta, "interval": "95% Student-t over seeds (mean +- t(0.975, n-1) sd/sqrt(n))",
            "base": base and {"accuracy": base["avg_at_k"], "accuracy_given_answer": base.get("accuracy_given_answer"),
                              "no_answer": base["no_answer"]},
            "groups": groups, "best": best, "lr_ratio_vs_full": ratio, "best_cells_overlap": overlap, "cells": cells}


def select(results: list[dict], names: dict[str, str]) -> dict:
    """One summary from the cells of several grids (same base config and seeds, so cells of a seed are paired
    across them): the variants in `names` (grid name -> name in the result), renamed, everything recomputed.
    The base row and the setup are the first grid's."""
    cells = [{**c, "variant": names[c["variant"]]} for r in results for c in r["cells"] if c["variant"] in names]
    seen = set()
    for c in cells:
        key = (c["variant"], c["lr"], c["seed"])
        if key in seen:
            raise ValueError(f"the cell {key} is in more than one of the grids summarised together")
        seen.add(key)
    first = results[0]
    base = first.get("base") and {"avg_at_k": first["base"]["accuracy"], "no_answer": first["base"]["no_answer"],
                                  "accuracy_given_answer": first["base"]["accuracy_given_answer"]}
    variants: dict[str, dict] = {}
    for r in results:  # a variant swept in several grids (e.g. at more LRs later): its LRs are theirs together
        for v, spec in r["variants"].items():
            if v in names:
                had = variants.get(names[v], {}).get("lrs", [])
                variants[names[v]] = {**spec, "lrs": sorted({*had, *spec["lrs"]})}
    meta = {k: v for k, v in first.items() if k not in _DERIVED}
    meta.update(variants=variants, full_variants=[v for v, s in variants.items() if s["full"]],
                run_time_s={k: v for r in results for k, v in r.get("run_time_s", {}).items()},
                grids=[r.get("dir") for r in results])
    return summarise(cells, base, meta)


# what summarise() and write() add to the meta they are given
_DERIVED = ("interval", "base", "groups", "best", "lr_ratio_vs_full", "best_cells_overlap", "cells", "table", "dir",
            "variants", "full_variants", "run_time_s")


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "(1 seed)"


def format_markdown(result: dict) -> str:
    lines = [f"held-out accuracy (avg@k) after {result.get('steps')} steps: mean over seeds; interval: "
             f"{result['interval']}", ""]
    if result.get("base"):
        b = result["base"]
        given = "" if b["accuracy_given_answer"] is None else f", {b['accuracy_given_answer']:.3f} given an answer"
        lines += [f"base model: {b['accuracy']:.3f}{given} (no answer {b['no_answer']:.3f})", ""]
    lines += ["| variant | LR | seeds | mean [95% CI] | per seed | given an answer | |", "|---|---|---|---|---|---|---|"]
    for g in result["groups"]:
        b = result["best"].get(g["variant"], {})
        is_best = b.get("lr") == g["lr"] and "mean" in g and "tied" not in b
        if "mean" not in g:
            lines.append(f"| {g['variant']} | {g['lr']:g} | 0 | (no result) | | | |")
            continue
        given = "" if g["mean_given_answer"] is None else f"{g['mean_given_answer']:.3f}"
        lines.append(f"| {g['variant']} | {g['lr']:g} | {len(g['seeds'])} | {g['mean']:.3f} {_fmt_ci(g['ci95'])} | "
                     f"{', '.join(f'{a:.3f}' for a in g['accuracy_per_seed'])} | {given} | {'best' if is_best else ''} |")
    lines += ["", "best LR per variant:"]
    for v, b in result["best"].items():
        if "tied" in b:
            lines.append(f"- {v}: none: LRs {', '.join(f'{lr:g}' for lr in b['tied'])} tie at {b['mean']:.3f}"
                         " (no LR ratio is read from a tie)")
            continue
        note = "" if "resolved" not in b else (f"; clear of the runner-up LR {b['runner_up_lr']:g}" if b["resolved"]
                                               else f"; not resolved: overlaps the runner-up LR {b['runner_up_lr']:g}")
        lines.append(f"- {v}: {b['lr']:g} ({b['mean']:.3f} {_fmt_ci(b['ci95'])}{note})")
    for v, r in result["lr_ratio_vs_full"].items():
        lines.append(f"- LR ratio {v} / full fine-tuning: {r:.3g}x (the paper: ~10x, ~15x under 100 steps)")
    if result["best_cells_overlap"] is not None:
        lines.append(f"- the variants' best cells {'overlap' if result['best_cells_overlap'] else 'do not all overlap'}"
                     " (95% intervals)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """The paper's plot: final held-out accuracy vs LR (log axis), one curve per variant, 95% interval bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant in dict.fromkeys(g["variant"] for g in result["groups"]):
        gs = sorted((g for g in result["groups"] if g["variant"] == variant and "mean" in g), key=lambda g: g["lr"])
        if not gs:
            continue
        err = [[g["mean"] - g["ci95"][0] if g["ci95"] else 0 for g in gs],
               [g["ci95"][1] - g["mean"] if g["ci95"] else 0 for g in gs]]
        ax.errorbar([g["lr"] for g in gs], [g["mean"] for g in gs], yerr=err, marker="o", capsize=3, label=variant)
    if result.get("base"):
        ax.axhline(result["base"]["accuracy"], color="grey", ls="--", lw=1, label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out accuracy (avg@k)")
    ax.set_title(f"{result.get('model', '')}, {result.get('steps')} steps; 95% t-interval over seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict, out_dir: Path) -> dict:
    """grid.json, grid.md and grid.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "grid.json").write_text(json.dumps(result, indent=1))
    table = format_markdown(result)
    (out_dir / "grid.md").write_text(table + "\n\n![held-out accuracy vs LR](grid.png)\n")
    plot(result, out_dir / "grid.png")
    return {"table": table, "dir": str(out_dir)}
