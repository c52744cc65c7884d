"""`rl-lora grid CONFIG`: learning rates x seeds x variants, as adapters of ONE run, plus full fine-tuning.

A grid config is a run config with a `grid:` section (GridConfig below), or a few sections on top of a run
config named by `grid.base` (experiments/ use this: one run config, a few grid files over it). Every LoRA cell (variant, LR, seed)
becomes one adapter of a single run: one base, one sampler, one learner, each adapter its own optimizer. Full
fine-tuning (a variant with `rank: full`) cannot share the base, so each of its (LR, seed) cells is its own run,
driven by the same command, one after another.

Seeds. A grid seed s sets, for every cell of that seed, the adapter's `seed` (init of A) and its `sample_seed`
(training-prompt order and request seeds); a full fine-tuning cell of seed s is a run with `train.seed: s`, which
sets the same two streams. So:
- cells of the same seed see the same prompts in the same order with the same request seeds, whatever their
  variant or LR (LoRA or full fine-tuning): comparisons across LRs and variants within a seed are paired;
- cells of different seeds differ in data order, request seeds and init: the seeds are independent replicates,
  and the summary's interval across them (rl_lora/grid_summary.py) is the one that says whether a difference is
  real.
Every cell is evaluated on the same held-out problems with the same request seeds (rl_lora/eval/runner.py:
LIVE_EVAL_SEED).

Layout of `train.output_dir` (the grid folder): `lora/` (the LoRA run: adapters/<variant>-lr=<lr>-s<seed>/,
eval/, metrics.jsonl), `<variant>-lr=<lr>-s<seed>/` per full fine-tuning cell, `configs/` (each run's config as
run), and the summary `grid.md`, `grid.json`, `grid.png`. A bad grid is refused in one line before any run starts.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rl_lora.config import (AdapterEntry, ConfigError, _build, _normalise_numbers, check_fields, config_from_data,
                            dump_yaml, read_config_data, setting)

LORA_RUN = "lora"  # the LoRA run's folder inside the grid folder
# Adapter keys a variant may not set: the grid sets them per cell, or they would break the pairing.
CELL_KEYS = ("name", "lr", "seed", "sample_seed", "data", "rewards")


def _positive_lrs(v) -> bool:
    return isinstance(v, list) and bool(v) and len(set(v)) == len(v) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and math.isfinite(x) for x in v)


@dataclass
class GridConfig:
    base: str = setting("", "a run config under this file's sections (path relative to this file); empty = this "
                        "file is the whole run config")
    lrs: list = setting([], "learning rates of every variant without its own `lrs` (finite, > 0, distinct; the plot's "
                        "log axis)", check=(_positive_lrs, "must be a non-empty list of distinct numbers > 0"))
    seeds: list = setting([0, 1, 2], "independent replicates: each sets init, prompt order and request seeds; >= 2 "
                          "for an interval", check=(lambda v: bool(v) and all(isinstance(s, int) and not
                                                                              isinstance(s, bool) and s >= 0 for s in v)
                                                    and len(set(v)) == len(v),
                                                    "must be a non-empty list of distinct integers >= 0"))
    # e.g. [{name: r1, rank: 1}, {name: attn, target_modules: attention}, {name: full, rank: full, lrs: [...]}]
    variants: list = setting([{}], "adapter settings per curve: any adapters[] key but name/lr/seed/sample_seed/data/"
                             "rewards, plus `name` and its own `lrs`; `rank: full` = full fine-tuning runs",
                             check=(lambda v: bool(v) and all(isinstance(x, dict) for x in v),
                                    "must be a non-empty list of mappings"))


@dataclass
class Variant:
    """One curve of the grid: its name, LRs and adapter settings (empty for full fine-tuning)."""

    name: str
    lrs: list
    settings: dict
    full: bool = False


@dataclass
class Cell:
    variant: str
    lr: float
    seed: int
    run: str  # folder of the run that trains it, inside the grid folder
    model: str  # its label in that run's eval table (adapter name, or "full-ft")


@dataclass
class Grid:
    """The expanded grid: the run configs (plain data, checked) and the cells they train."""

    dir: Path
    grid: GridConfig
    variants: list
    runs: dict  # run folder name -> config data
    cells: list


def variant_name(settings: dict) -> str:
    """A file-name-safe default name: its settings joined (`rank=8-target_modules=attention`), or `lora`."""
    if settings.get("rank") == "full":
        return "full"
    parts = []
    for k, v in settings.items():
        v = "+".join(map(str, v)) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
        parts.append(f"{k}={v}")
    return "-".join(parts) or "lora"


def parse_variants(grid: GridConfig) -> list[Variant]:
    out = []
    for i, raw in enumerate(grid.variants):
        key = f"grid.variants[{i}]"
        raw = dict(raw)
        for bad in CELL_KEYS[1:]:
            if bad in raw:
                raise ConfigError(f"{key}.{bad}: set per cell by the grid (LR from lrs, seed from grid.seeds; data "
                                  "and rewards are the run's, so that cells are paired); remove it")
        name, lrs = raw.pop("name", None), raw.pop("lrs", grid.lrs)
        if not _positive_lrs(lrs):
            raise ConfigError(f"{key}.lrs: must be a non-empty list of distinct numbers > 0, got {lrs!r}"
                              + ("" if grid.lrs else " (grid.lrs is empty)"))
        full = raw.get("rank") == "full"
        if full and set(raw) != {"rank"}:
            raise ConfigError(f"{key}: a full fine-tuning variant (rank: full) takes only name and lrs, got "
                              f"{', '.join(sorted(set(raw) - {'rank'}))}")
        if not full:  # the adapter's own checks, named by the grid key
            check_fields(_build(AdapterEntry, raw, f"{key}."), f"{key}.")
        name = variant_name(raw) if name is None else name
        if not (isinstance(name, str) and name and all(c.isalnum() or c in "._=+-" for c in name)):
            raise ConfigError(f"{key}.name: {name!r} must be a non-empty file name (letters, digits, ._=+-)")
        if name in [v.name for v in out]:
            raise ConfigError(f"{key}.name: {name!r} is used twice (name the variants)")
        out.append(Variant(name, [float(x) for x in lrs], {} if full else raw, full))
    return out


def cell_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}-lr={lr:g}-s{seed}"


def expand(path: str | None, overrides: list[str]) -> Grid:
    """The grid config at `path` (+ overrides) as runs and cells, every run config checked: nothing loads a model."""
    data = read_config_data(path, overrides)
    if "grid" not in data:
        raise ConfigError("grid: the config has no grid section (grid: {lrs: [...], seeds: [...], variants: [...]})")
    grid = _build(GridConfig, _normalise_numbers(data.pop("grid") or {}), "grid.")  # YAML 1.1 reads 1e-3 as text
    check_fields(grid, "grid.")
    if grid.base:
        under = read_config_data(Path(path).parent / grid.base if path else grid.base, [])
        if "grid" in under:
            raise ConfigError(f"grid.base: {grid.base} has a grid section itself; name a run config")
        data = {**under, **{k: {**under.get(k, {}), **v} if isinstance(v, dict) and isinstance(under.get(k), dict)
                            else v for k, v in data.items()}}
    if data.get("adapters"):
        raise ConfigError("adapters: a grid config must not list adapters itself (grid.variants makes them)")
    if str(data.get("lora", {}).get("rank", 1)) == "full":
        raise ConfigError("lora.rank: full in a grid config; add a variant {rank: full} instead")
    base = config_from_data(data)  # the run's own checks, once, with the run's own key names
    variants = parse_variants(grid)
    top = Path(base.train.output_dir)
    runs, cells, adapters = {}, [], []
    for v in variants:
        for lr in v.lrs:
            for seed in grid.seeds:
                name = cell_name(v.name, lr, seed)
                if v.full:
                    runs[name] = _with(data, {"lora": {"rank": "full"}, "optim": {"lr": lr},
                                              "train": {"seed": seed, "output_dir": str(top / name)}})
                    cells.append(Cell(v.name, lr, seed, name, "full-ft"))
                else:
                    adapters.append({"name": name, "lr": lr, "seed": seed, "sample_seed": seed, **v.settings})
                    cells.append(Cell(v.name, lr, seed, LORA_RUN, name))
    if adapters:
        runs = {LORA_RUN: _with(data, {"train": {"output_dir": str(top / LORA_RUN)}}, adapters=adapters), **runs}
    for name, run in runs.items():
        try:
            config_from_data(run)
        except ConfigError as exc:
            raise ConfigError(f"grid run {name}: {exc}") from None
    return Grid(top, grid, variants, runs, cells)


def _with(data: dict, sections: dict, adapters: list | None = None) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values}
    if adapters is not None:
        out["adapters"] = adapters
    return out


def describe(g: Grid) -> str:
    """What the grid will run, in a few lines (`rl-lora grid CONFIG --list`)."""
    lines = [f"grid: {len(g.cells)} cells = {len(g.variants)} variants x LRs x {len(g.grid.seeds)} seeds "
             f"(seeds {', '.join(map(str, g.grid.seeds))}), in {len(g.runs)} run{'s' * (len(g.runs) > 1)} under {g.dir}/"]
    for v in g.variants:
        keys = ", ".join(f"{k}={val}" for k, val in v.settings.items()) or "lora.*"
        what = "full fine-tuning, one run per cell" if v.full else f"adapters of {LORA_RUN}/ ({keys})"
        lines.append(f"  {v.name}: LRs {', '.join(f'{x:g}' for x in v.lrs)}; {what}")
    return "\n".join(lines)


def check_folders(g: Grid, resume: bool, overwrite: bool) -> None:
    """Every run's folder is checked before the first run starts (a conflict in the last one stops nothing
    half-way)."""
    from rl_lora import rundir

    for name in g.runs:
        rundir.check_folder(g.dir / name, resume, overwrite)


def run_all(g: Grid, *, resume: bool, overwrite: bool, quiet: bool) -> dict:
    """Train every run of the grid, one after another, each in its own process (an engine and a learner at a
    time); returns each run's wall time in seconds. A failed run stops the grid (its error is the last line)."""
    check_folders(g, resume, overwrite)
    (g.dir / "configs").mkdir(parents=True, exist_ok=True)
    times = {}
    for i, (name, data) in enumerate(g.runs.items(), 1):
        if resume and finished(g.dir / name, data):
            print(f"grid: run {name} is finished (--resume), kept as it is", flush=True)
            continue
        path = g.dir / "configs" / f"{name}.yaml"
        path.write_text(dump_yaml(config_from_data(data)))
        flags = [f for f, on in (("--resume", resume), ("--overwrite", overwrite), ("--quiet", quiet)) if on]
        print(f"grid: run {name} ({i}/{len(g.runs)})", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "rl_lora.cli", "train", str(path), *flags])
        times[name] = round(time.perf_counter() - t0, 1)
        if res.returncode != 0:
            from rl_lora.errors import RunError

            raise RunError(f"grid run {name} failed (exit {res.returncode}); the runs before it are kept; fix it and "
                           "continue with --resume")
    return times


def finished(run_dir: Path, data: dict) -> bool:
    """The run has its final table and its last checkpoint is at train.steps (nothing left to train)."""
    from rl_lora import checkpoint

    latest = checkpoint.latest(run_dir) if run_dir.is_dir() else None
    steps = config_from_data(data).train.steps
    return (run_dir / "eval" / "eval_results.json").is_file() and latest is not None and \
        checkpoint.step_of(latest) == steps


def cell_results(g: Grid) -> tuple[list[dict], dict | None]:
    """Each cell's final held-out result, read from its run's eval/eval_results.json (None where missing)."""
    import json

    tables = {}
    for name in g.runs:
        path = g.dir / name / "eval" / "eval_results.json"
        rows = json.loads(path.read_text())["results"] if path.is_file() else []
        tables[name] = {r["model"].rsplit("@", 1)[0]: r for r in rows}
    out = []
    for c in g.cells:
        row = tables[c.run].get(c.model)
        out.append({**dataclasses.asdict(c), "accuracy": row and row["avg_at_k"],
                    "accuracy_given_answer": row and row.get("accuracy_given_answer"),
                    "no_answer": row and row["no_answer"]})
    base = next((t["base"] for t in tables.values() if "base" in t), None)  # the LoRA run's, when it has one
    return out, base


def summarise(g: Grid, times: dict | None = None) -> dict:
    """Read every cell's result and write grid.json, grid.md and grid.png into the grid folder."""
    from rl_lora import grid_summary

    first = config_from_data(next(iter(g.runs.values())))
    cells, base = cell_results(g)
    meta = {"model": first.model.path, **_model_shape(first.model.path), "data": first.data.source,
            "steps": first.train.steps, "prompts_per_step": first.train.prompts_per_step,
            "samples_per_prompt": first.sampler.samples_per_prompt, "eval_problems": first.data.eval_size,
            "eval_samples": first.train.eval_samples, "seeds": g.grid.seeds,
            "variants": {v.name: {"lrs": v.lrs, "settings": v.settings, "full": v.full} for v in g.variants},
            "full_variants": [v.name for v in g.variants if v.full], "run_time_s": times or {}}
    result = grid_summary.summarise(cells, base, meta)
    result.update(grid_summary.write(result, g.dir))
    return result


def _model_shape(path: str) -> dict:
    """The model's family, type and width, for `lr-suggest` to match measured grids to a model ({} if unreadable)."""
    from rl_lora.models import resolve_model_path
    from rl_lora.science import read_shape

    try:
        shape = read_shape(resolve_model_path(path))  # the runs have resolved (converted) it already
    except (ConfigError, OSError, KeyError, ValueError):
        return {}
    return {"model_type": shape.model_type, "family": shape.family, "hidden_size": shape.hidden_size}
