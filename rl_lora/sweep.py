"""`rl-lora sweep`: K learning rates as K adapters of ONE run (one base, one sampler, one learner), then a
summary table with the best adapter by held-out score marked.

A 4-point sweep costs one run instead of four: the K adapters share every generate call (multi-LoRA) and every
learner forward/backward (routed LoRA layers); each keeps its own optimizer. All adapters see the same prompts
with the same request seeds, so their held-out scores are paired comparisons.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rl_lora.config import Config, ConfigError, adapter_specs, load_config
from rl_lora.metrics import read_metrics


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lr: expected comma-separated numbers, got {text!r}") from None
    if len(lrs) < 2:
        raise ConfigError(f"--lr: a sweep needs at least 2 learning rates, got {text!r}")
    if any(not (math.isfinite(x) and x >= 0) for x in lrs):
        raise ConfigError(f"--lr: learning rates must be finite and >= 0, got {text!r}")
    if len(set(lrs)) != len(lrs):
        raise ConfigError(f"--lr: a learning rate is listed twice in {text!r}")
    return lrs


def sweep_config(path: str, lrs: list[float], overrides: list[str]) -> Config:
    """The run config with one adapter per LR (everything else from lora.*); the engine is sized for K + 1."""
    plain = load_config(path, overrides)
    if plain.adapters:
        raise ConfigError("adapters: a sweep config must not list adapters itself (--lr makes them)")
    adapters = "[" + ", ".join(f"{{lr: {lr!r}}}" for lr in lrs) + "]"
    loras = max(plain.sampler.max_loras, len(lrs) + 1)
    return load_config(path, list(overrides) + [f"adapters={adapters}", f"sampler.max_loras={loras}"])


def summarise(cfg: Config, summary: dict) -> dict:
    """Per adapter: LR, train reward over the last steps, held-out avg@k with its interval and the paired delta
    vs the base model. The best by held-out avg@k is marked. Writes sweep.json and sweep.md in the run dir."""
    run_dir = Path(summary["run_dir"])
    specs = adapter_specs(cfg)
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "reward/mean" in r]
    last = train_rows[-min(4, len(train_rows)):] if train_rows else []
    evals = {r["model"].rsplit("@", 1)[0]: r for r in summary.get("eval_rows", [])[1:]}
    base = (summary.get("eval_rows") or [{}])[0]
    out = []
    for spec in specs:
        e = evals.get(spec.name, {})
        out.append({"adapter": spec.name, "lr": spec.lr, "rank": spec.rank, "target_modules": spec.target_modules,
                    "train_reward_last": (sum(r[f"{spec.name}/reward/mean"] for r in last) / len(last)) if last else None,
                    "heldout_avg": e.get("avg_at_k"), "heldout_ci95": e.get("avg_at_k_ci95"),
                    "delta_vs_base": e.get("delta_avg_vs_base"), "delta_ci95": e.get("delta_avg_vs_base_ci95")})
    scored = sorted((r for r in out if r["heldout_avg"] is not None), key=lambda r: -r["heldout_avg"])
    best = scored[0]["adapter"] if scored else None
    for r in out:
        r["best"] = r["adapter"] == best
    margin = None
    if len(scored) >= 2:  # is the best really better? paired bootstrap on the same problems and seeds
        from rl_lora.eval.metrics import paired_delta
        from rl_lora.eval.runner import LIVE_EVAL_SEED

        a, b = evals[scored[0]["adapter"]], evals[scored[1]["adapter"]]
        k = cfg.train.eval_samples or 1
        delta, ci = paired_delta(a["correct_per_problem"], b["correct_per_problem"], k, seed=LIVE_EVAL_SEED)
        margin = {"runner_up": scored[1]["adapter"], "delta": delta, "ci95": ci}
    result = {"base_heldout_avg": base.get("avg_at_k"), "adapters": out, "best": best, "best_vs_runner_up": margin,
              "steps": cfg.train.steps, "plot": summary.get("plot")}
    (run_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    table = format_sweep(result, len(last))
    (run_dir / "sweep.md").write_text(table + "\n")
    result["table"] = table
    return result


def format_sweep(result: dict, last_steps: int) -> str:
    def ci(pair):
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else ""

    lines = [f"| adapter | LR | train reward (last {last_steps} steps) | held-out avg@k [95% CI] | "
             "delta vs base [95% CI] | |", "|---|---|---|---|---|---|"]
    if result["base_heldout_avg"] is not None:
        lines.append(f"| base | - | - | {result['base_heldout_avg']:.3f} | | |")
    for r in result["adapters"]:
        train = "" if r["train_reward_last"] is None else f"{r['train_reward_last']:.3f}"
        held = "" if r["heldout_avg"] is None else f"{r['heldout_avg']:.3f} {ci(r['heldout_ci95'])}"
        delta = "" if r["delta_vs_base"] is None else f"{r['delta_vs_base']:+.3f} {ci(r['delta_ci95'])}"
        lines.append(f"| {r['adapter']} | {r['lr']:g} | {train} | {held} | {delta} | {'best' if r['best'] else ''} |")
    m = result.get("best_vs_runner_up")
    if m:
        verdict = "a real margin" if m["ci95"][0] > 0 else "within noise: the interval includes 0"
        lines.append(f"\nbest vs runner-up ({m['runner_up']}): {m['delta']:+.3f} [{m['ci95'][0]:+.3f}, "
                     f"{m['ci95'][1]:+.3f}] held-out avg@k, paired ({verdict})")
    return "\n".join(lines)
