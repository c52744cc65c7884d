"""Result files of an evaluation: the Markdown table, the pass@k plot, eval_results.json/.md and
eval_samples.jsonl (every completion)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rl_lora.eval.metrics import BOOTSTRAP_RESAMPLES


def _ci(row: dict, key: str) -> str:
    lo, hi = row[f"{key}_ci95"]
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _given(row: dict) -> str:
    value = row.get("accuracy_given_answer")  # absent in results written before it existed
    return "—" if value is None else f"{value:.3f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table, one line per (eval set, model); readable in a terminal too."""
    k = rows[0]["k"] if rows else 0
    head = ["data", "model", "n", f"avg@{k} [95% CI]", "pass@1", f"pass@{k} [95% CI]", f"maj@{k} [95% CI]",
            "Δavg vs base [95% CI]", "acc. given an answer", "mean len", "truncated", "no answer", "timeouts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in sorted(rows, key=lambda r: r["dataset"]):  # stable: models keep their order within a set
        delta = "—"
        if "delta_avg_vs_base" in r:
            lo, hi = r["delta_avg_vs_base_ci95"]
            delta = f"{r['delta_avg_vs_base']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        cells = [r["dataset"], r["model"], str(r["problems"]), _ci(r, "avg_at_k"), f"{r['pass_at_k'][0]:.3f}",
                 f"{r['pass_at_k'][-1]:.3f} [{r['pass_at_k_ci95'][0]:.3f}, {r['pass_at_k_ci95'][1]:.3f}]",
                 _ci(r, "maj_at_k"), delta, _given(r), f"{r['length_mean']:.1f}", f"{r['truncated']:.3f}",
                 f"{r['no_answer']:.3f}", str(r["timeouts"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_pass_at_k(rows: list[dict], path: Path) -> Path:
    """pass@k against k (log2 axis), one panel per eval set, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.5), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        for r in (r for r in rows if r["dataset"] == name):
            ks = list(range(1, r["k"] + 1))
            ax.plot(ks, r["pass_at_k"], marker="o", markersize=3, label=r["model"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{name} ({next(r['problems'] for r in rows if r['dataset'] == name)} problems)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out_dir: Path, payload: dict, sample_rows: list[dict]) -> dict:
    """eval_results.json, eval_results.md, pass_at_k.png and eval_samples.jsonl (every completion) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval_results.json").write_text(json.dumps(payload, indent=2, default=_json_default))
    c = payload["config"]
    md = [f"# Evaluation: {c['model']}", "",
          f"k = {c['k']} samples per problem, temperature {c['temperature']}, top_p {c['top_p']}, "
          f"max_tokens {c['max_tokens']}, seed {c['seed']}. Intervals: 95% percentile bootstrap over problems "
          f"({BOOTSTRAP_RESAMPLES} resamples); Δ is paired with the base model.", "",
          format_table(payload["results"]), ""]
    md += [f"- `{name}`: {origin}" for name, origin in payload["data"].items()]
    (out_dir / "eval_results.md").write_text("\n".join(md) + "\n")
    with (out_dir / "eval_samples.jsonl").open("w") as f:
        for row in sample_rows:
            f.write(json.dumps(row) + "\n")
    plot_pass_at_k(payload["results"], out_dir / "pass_at_k.png")
    return payload


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
