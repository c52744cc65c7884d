"""`rl-lora grid`: expansion into runs and cells, the seeds' pairing, the summary math, refused specs (fast, no
model), and one tiny-model grid end to end (slow)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from runhelpers import ROOT, TESTS

from rl_lora.config import adapter_specs, config_from_data, run_specs
from rl_lora.errors import ConfigError
from rl_lora.grid import LORA_RUN, cell_name, expand
from rl_lora.grid_summary import best_per_variant, format_markdown, group_cells, mean_ci, summarise, t975, write

GRID = {"lrs": [1e-3, 3e-3], "seeds": [0, 1, 2],
        "variants": [{"name": "r1"}, {"name": "attn", "target_modules": "attention", "rank": 2},
                     {"name": "full", "rank": "full", "lrs": [1e-4]}]}


def _grid_file(tmp_path, grid=GRID, **sections):
    data = {"model": {"path": "some/model"}, "data": {"train_size": 50, "eval_size": 4, "max_operand": 20},
            "train": {"steps": 2, "output_dir": str(tmp_path / "g")}, "grid": grid, **sections}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_expands_into_one_lora_run_and_one_run_per_full_finetuning_cell(tmp_path):
    g = expand(str(_grid_file(tmp_path)), [])
    assert list(g.runs) == [LORA_RUN, "full-lr=0.0001-s0", "full-lr=0.0001-s1", "full-lr=0.0001-s2"]
    assert len(g.cells) == 2 * 2 * 3 + 3
    lora = config_from_data(g.runs[LORA_RUN])
    specs = adapter_specs(lora)
    assert [s.name for s in specs][:3] == ["r1-lr=0.001-s0", "r1-lr=0.001-s1", "r1-lr=0.001-s2"]
    assert all(s.seed == s.sample_seed == int(s.name[-1]) for s in specs)
    attn = [s for s in specs if s.name.startswith("attn")]
    assert len(attn) == 6 and all(s.rank == 2 and s.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
                                  for s in attn)
    assert lora.train.output_dir == str(tmp_path / "g" / LORA_RUN)
    full = config_from_data(g.runs["full-lr=0.0001-s2"])
    assert (full.lora.rank, full.optim.lr, full.train.seed, full.adapters) == ("full", 1e-4, 2, [])
    assert full.train.output_dir == str(tmp_path / "g" / "full-lr=0.0001-s2")
    assert cell_name("r1", 3e-3, 1) == "r1-lr=0.003-s1"


def test_cells_of_a_seed_share_prompt_order_and_request_seeds_and_seeds_differ(tmp_path):
    """The pairing, from the code the loop uses: a LoRA cell's prompt stream is (dataset, sample seed); a full
    fine-tuning run of seed s has the same stream as the LoRA cells of seed s; request seeds derive from it."""
    from rl_lora.data import PromptStream
    from rl_lora.seeds import step_seed
    from rl_lora.train import load_tasks

    g = expand(str(_grid_file(tmp_path)), [])
    lora = config_from_data(g.runs[LORA_RUN])
    specs = adapter_specs(lora)
    tasks, task_of = load_tasks(lora, specs)
    assert len(tasks) == 3  # one stream per seed, one dataset
    assert len({id(t.train) for t in tasks}) == 1 and all(t.prefix == "" and t.eval_dir == "eval" for t in tasks)
    for k, spec in enumerate(specs):
        assert tasks[task_of[k]].seed == spec.sample_seed
    orders = {}
    for seed in (0, 1, 2):
        full = config_from_data(g.runs[f"full-lr=0.0001-s{seed}"])
        (ft,), _ = load_tasks(full, run_specs(full))
        mine = [t for t in tasks if t.seed == seed]
        assert len(mine) == 1 and (ft.seed, ft.dataset) == (mine[0].seed, mine[0].dataset)
        assert [p.question for p in ft.train] == [p.question for p in mine[0].train]
        orders[seed] = PromptStream(len(ft.train), ft.seed + ft.dataset).next(8)
        assert step_seed(ft.seed, 3) == step_seed(mine[0].seed, 3)
    assert len({tuple(o) for o in orders.values()}) == 3  # seeds differ in data order
    assert len({step_seed(s, 1) for s in (0, 1, 2)}) == 3  # and in request seeds


def test_a_run_without_sample_seeds_keeps_its_streams():
    """Tenants and plain K-adapter runs: one stream per dataset, seeded train.seed + dataset index, as before."""
    from rl_lora.train import load_tasks

    cfg = config_from_data({"data": {"train_size": 30, "eval_size": 2}, "train": {"seed": 5},
                            "adapters": [{"name": "a"}, {"name": "b", "seed": 3},
                                         {"name": "c", "data": {"operations": "*"}}]})
    tasks, task_of = load_tasks(cfg, adapter_specs(cfg))
    assert task_of == [0, 0, 1] and [(t.seed, t.dataset) for t in tasks] == [(5, 0), (5, 1)]


@pytest.mark.parametrize("grid, message", [
    ({"lrs": []}, "grid.lrs: must be a non-empty list of distinct numbers > 0"),
    ({"lrs": [1e-3, 1e-3]}, "grid.lrs: must be a non-empty list of distinct numbers > 0"),
    ({"lrs": [0.0]}, "grid.lrs"),
    ({"lrs": [1e-3], "seeds": [0, 0]}, "grid.seeds: must be a non-empty list of distinct integers >= 0"),
    ({"lrs": [1e-3], "sedes": [0]}, "unknown config key 'grid.sedes'"),
    ({"lrs": [1e-3], "variants": [{"lr": 1e-3}]}, "grid.variants[0].lr: set per cell by the grid"),
    ({"lrs": [1e-3], "variants": [{"rank": 0}]}, "grid.variants[0].rank: must be an integer >= 1"),
    ({"lrs": [1e-3], "variants": [{"rnak": 2}]}, "unknown config key 'grid.variants[0].rnak'"),
    ({"lrs": [1e-3], "variants": [{"rank": "full", "target_modules": "mlp"}]}, "takes only name and lrs"),
    ({"lrs": [1e-3], "variants": [{"name": "a"}, {"name": "a", "rank": 2}]}, "'a' is used twice"),
    ({"lrs": [1e-3], "variants": [{"name": "a/b"}]}, "must be a non-empty file name"),
    ({"lrs": [1e-3], "variants": [{"target_modules": "everything"}]}, "unknown preset 'everything'"),
])
def test_bad_grid_specs_are_refused_in_one_line_before_anything_runs(tmp_path, grid, message):
    path = _grid_file(tmp_path, grid)
    env = {"PYTHONPATH": f"{TESTS}:{ROOT}", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "rl_lora.cli", "grid", str(path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env=env)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "g").exists()


def test_a_grid_file_can_sit_on_top_of_a_run_config(tmp_path):
    base = _grid_file(tmp_path)
    (tmp_path / "q").mkdir()
    top = tmp_path / "q" / "grid.yaml"
    top.write_text(yaml.safe_dump({"grid": {"base": "../grid.yaml", "lrs": [1e-2]}}))
    with pytest.raises(ConfigError, match="has a grid section itself"):
        expand(str(top), [])
    base.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(base.read_text()).items() if k != "grid"}))
    top.write_text(yaml.safe_dump({"grid": {"base": "../grid.yaml", "lrs": [1e-2], "seeds": [4]},
                                   "train": {"steps": 5}}))
    g = expand(str(top), ["train.prompts_per_step=3", "grid.lrs=[1e-2]"])  # 1e-2: text to YAML 1.1, a number here
    run = config_from_data(g.runs[LORA_RUN])
    assert (run.train.steps, run.train.prompts_per_step, run.data.train_size) == (5, 3, 50)
    assert run.train.output_dir == str(tmp_path / "g" / LORA_RUN) and [c.seed for c in g.cells] == [4]
    top.write_text(yaml.safe_dump({"grid": {"base": "missing.yaml", "lrs": [1e-2]}}))
    with pytest.raises(ConfigError, match="config file not found"):
        expand(str(top), [])


def test_grid_refuses_a_config_without_a_grid_or_with_its_own_adapters(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 1}}))
    with pytest.raises(ConfigError, match="no grid section"):
        expand(str(path), [])
    with pytest.raises(ConfigError, match="must not list adapters"):
        expand(str(_grid_file(tmp_path, adapters=[{"name": "x"}])), [])
    with pytest.raises(ConfigError, match="grid run lora: sampler.max_loras"):  # each run's own checks, named
        expand(str(_grid_file(tmp_path, sampler={"max_loras": 3})), [])


def test_t_quantiles_and_the_interval_over_seeds():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert abs(t975(40) - 2.021) < 1e-3 and abs(t975(120) - 1.980) < 1e-3
    mean, ci, sd = mean_ci([0.5, 0.6, 0.7])
    assert math.isclose(mean, 0.6) and math.isclose(sd, 0.1)
    half = 4.303 * 0.1 / math.sqrt(3)
    assert math.isclose(ci[0], 0.6 - half) and math.isclose(ci[1], 0.6 + half)
    assert mean_ci([0.4]) == (0.4, None, None)


def _cells():
    acc = {("r1", 1e-3): [0.30, 0.34, 0.32], ("r1", 1e-2): [0.60, 0.64, 0.62], ("r1", 1e-1): [0.1, 0.5, 0.9],
           ("full", 1e-4): [0.50, 0.56, 0.53], ("full", 1e-3): [0.20, 0.22, None]}
    return [{"variant": v, "lr": lr, "seed": s, "accuracy": a, "accuracy_given_answer": a and a + 0.1}
            for (v, lr), values in acc.items() for s, a in enumerate(values)]


def test_summary_groups_seeds_picks_the_best_lr_and_the_ratio_to_full_finetuning(tmp_path):
    groups = group_cells(_cells())
    g = next(x for x in groups if (x["variant"], x["lr"]) == ("r1", 1e-2))
    assert g["seeds"] == [0, 1, 2] and math.isclose(g["mean"], 0.62) and math.isclose(g["mean_given_answer"], 0.72)
    partial = next(x for x in groups if (x["variant"], x["lr"]) == ("full", 1e-3))
    assert partial["seeds"] == [0, 1] and partial["missing_seeds"] == [2]
    best = best_per_variant(groups)
    assert best["r1"]["lr"] == 1e-2 and best["r1"]["resolved"] is False  # 1e-1's wide interval overlaps it
    assert best["full"]["lr"] == 1e-4 and best["full"]["resolved"] is True
    result = summarise(_cells(), {"avg_at_k": 0.2, "accuracy_given_answer": 0.3, "no_answer": 0.1},
                       {"full_variants": ["full"], "steps": 2, "model": "m"})
    assert math.isclose(result["lr_ratio_vs_full"]["r1"], 100.0) and "full" not in result["lr_ratio_vs_full"]
    assert result["best_cells_overlap"] is True  # r1's best [0.570, 0.670] and full's [0.456, 0.605]
    out = write(result, tmp_path)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert json.loads((tmp_path / "grid.json").read_text())["best"]["r1"]["lr"] == 1e-2
    md = (tmp_path / "grid.md").read_text()
    assert "| r1 | 0.01 | 3 | 0.620 [" in md and "LR ratio r1 / full fine-tuning: 100x" in md and out["table"] in md



def test_a_tie_at_the_top_names_no_best_lr_and_no_lr_ratio(tmp_path):
    """A tiny random model scores 0 at every LR (seen in a 64-adapter grid): the summary must not call the first
    LR 'best' nor read an LR ratio to full fine-tuning from it; a variant that learned keeps its ratio."""
    cells = [{"variant": v, "lr": lr, "seed": s, "accuracy": a, "accuracy_given_answer": None}
             for v, lrs in (("flat", {1e-3: 0.0, 1e-2: 0.0, 1e-1: 0.0}), ("r1", {1e-3: 0.2, 1e-2: 0.5}),
                            ("full", {1e-4: 0.4, 1e-3: 0.1}))
             for lr, a in lrs.items() for s in range(3)]
    result = summarise(cells, None, {"full_variants": ["full"], "steps": 2, "model": "m"})
    assert result["best"]["flat"]["tied"] == [1e-3, 1e-2, 1e-1] and "tied" not in result["best"]["r1"]
    assert result["lr_ratio_vs_full"] == {"r1": 100.0}
    md = format_markdown(result)
    assert "- flat: none: LRs 0.001, 0.01, 0.1 tie at 0.000" in md and "LR ratio flat" not in md
    assert not any(line.startswith("| flat |") and line.endswith("best |") for line in md.splitlines())
    tied_full = summarise([c for c in cells if c["variant"] != "full"]
                          + [{**c, "variant": "full", "accuracy": 0.0} for c in cells if c["variant"] == "r1"],
                          None, {"full_variants": ["full"], "steps": 2, "model": "m"})
    assert tied_full["lr_ratio_vs_full"] == {}  # full FT's own optimum is a tie: no ratio for anyone


def test_a_summary_can_be_selected_from_several_grids_and_renamed():
    """grid_summary.select: the variants of two grids (here: r1 in one, full in the other), renamed, recomputed
    as one summary, equal to summarising those cells directly."""
    from rl_lora.grid_summary import select

    base = {"avg_at_k": 0.2, "accuracy_given_answer": 0.3, "no_answer": 0.1}
    meta = {"steps": 2, "model": "m", "variants": {"r1": {"lrs": [1e-2], "settings": {}, "full": False},
                                                   "full": {"lrs": [1e-4], "settings": {}, "full": True}}}
    lora = summarise([c for c in _cells() if c["variant"] == "r1"], base,
                     {**meta, "variants": {"r1": meta["variants"]["r1"]}, "full_variants": []})
    full = summarise([c for c in _cells() if c["variant"] == "full"], base,
                     {**meta, "variants": {"full": meta["variants"]["full"]}, "full_variants": ["full"]})
    got = select([lora, full], {"r1": "rank1", "full": "full"})
    direct = summarise([{**c, "variant": "rank1" if c["variant"] == "r1" else c["variant"]} for c in _cells()],
                       base, {**meta, "full_variants": ["full"]})
    assert got["best"] == direct["best"] and got["groups"] == direct["groups"]
    assert math.isclose(got["lr_ratio_vs_full"]["rank1"], 100.0) and got["base"] == direct["base"]
    assert set(got["variants"]) == {"rank1", "full"} and got["full_variants"] == ["full"]
    only = select([lora, full], {"r1": "plain"})
    assert set(only["best"]) == {"plain"} and only["lr_ratio_vs_full"] == {}

def test_a_variant_swept_in_two_grids_gets_both_grids_lrs_and_a_cell_in_both_is_refused():
    """A later grid adds LRs to a variant of an earlier one (experiments/cells/rank1-low.yaml below rank1.yaml):
    select sums up the cells of both, under the LRs of both; the same (variant, LR, seed) twice is an error."""
    from rl_lora.grid_summary import select

    def grid(lrs):
        cells = [c for c in _cells() if c["variant"] == "r1" and c["lr"] in lrs]
        return summarise(cells, None, {"steps": 2, "full_variants": [],
                                       "variants": {"r1": {"lrs": lrs, "settings": {}, "full": False}}})

    got = select([grid([1e-2, 1e-1]), grid([1e-3])], {"r1": "rank1"})
    assert got["variants"]["rank1"]["lrs"] == [1e-3, 1e-2, 1e-1] and len(got["cells"]) == 9
    assert got["best"]["rank1"]["lr"] == 1e-2
    assert [g["lr"] for g in got["groups"]] == [1e-3, 1e-2, 1e-1]  # ascending, whatever the grids' order
    with pytest.raises(ValueError, match=r"\('rank1', 0.01, 0\) is in more than one"):
        select([grid([1e-2]), grid([1e-2])], {"r1": "rank1"})


@pytest.mark.slow
def test_a_tiny_grid_runs_end_to_end_with_paired_seeds(tmp_path, tiny_model):
    """2 LoRA variants x 2 LRs x 2 seeds as 8 adapters of one run, and a full fine-tuning variant (1 LR x 2 seeds,
    2 runs), 2 steps each: every cell has a result, the summary groups the seeds, and the pairing holds in the
    runs themselves: at step 1 every adapter is still the base (B = 0), so adapters of the same seed (same prompts,
    same request seeds) sample the same completions; the full fine-tuning run of seed 0 trains on the prompts of
    the LoRA run's seed-0 cells, and seed 1 on others."""
    from runhelpers import metrics, write_config

    cfg = yaml.safe_load(write_config(tmp_path, tiny_model, train={"steps": 2, "save_every": 0, "eval_samples": 2,
                                                                   "prompts_per_step": 2},
                                      data={"eval_size": 4}).read_text())
    cfg["train"]["output_dir"] = str(tmp_path / "g")
    cfg["grid"] = {"lrs": [1e-3, 5e-3], "seeds": [0, 1],
                   "variants": [{"name": "r1"}, {"name": "attn", "target_modules": "attention"},
                                {"name": "full", "rank": "full", "lrs": [1e-4]}]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"PYTHONPATH": f"{TESTS}:{ROOT}", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "rl_lora.cli", "grid", str(path), "--quiet"], capture_output=True,
                         text=True, cwd=ROOT, timeout=1500, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    g = tmp_path / "g"
    result = json.loads((g / "grid.json").read_text())
    assert len(result["cells"]) == 10 and all(c["accuracy"] is not None for c in result["cells"])
    assert [(x["variant"], x["lr"], x["seeds"]) for x in result["groups"]] == [
        ("r1", 1e-3, [0, 1]), ("r1", 5e-3, [0, 1]), ("attn", 1e-3, [0, 1]), ("attn", 5e-3, [0, 1]),
        ("full", 1e-4, [0, 1])]
    assert all(x["ci95"][0] <= x["mean"] <= x["ci95"][1] for x in result["groups"])
    assert set(result["best"]) == {"r1", "attn", "full"}
    untied = "tied" not in result["best"]["full"]  # a random model may score 0 at every LR: a tie names no ratio
    assert set(result["lr_ratio_vs_full"]) == {v for v in ("r1", "attn") if untied and "tied" not in result["best"][v]}
    assert set(result["run_time_s"]) == {"lora", "full-lr=0.0001-s0", "full-lr=0.0001-s1"}
    assert (g / "grid.png").stat().st_size > 1000 and "| r1 | 0.001 | 2 |" in (g / "grid.md").read_text()
    first = next(r for r in metrics(g / "lora") if r.get("step") == 1 and "reward/mean" in r)
    names = [c["model"] for c in result["cells"] if c["run"] == "lora"]
    for seed in (0, 1):
        same = {first[f"{n}/reward/mean"] for n in names if n.endswith(f"-s{seed}")}
        assert len(same) == 1, same  # 4 cells of one seed, one policy (the base), the same samples

    def prompts(run):
        return [json.loads(line)["prompt"] for line in (run / "samples.jsonl").read_text().splitlines()]

    assert prompts(g / "full-lr=0.0001-s0") == prompts(g / "lora")  # the LoRA run logs its first adapter (seed 0)
    assert prompts(g / "full-lr=0.0001-s1") != prompts(g / "lora")
    assert "best LR per variant" in res.stdout


def test_grid_list_prints_the_runs_and_writes_nothing(tmp_path, capsys):
    from rl_lora import cli

    assert cli.main(["grid", str(_grid_file(tmp_path)), "--list", "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "15 cells = 3 variants x LRs x 3 seeds (seeds 0, 1, 2), in 4 runs" in out
    assert "full: LRs 0.0001; full fine-tuning, one run per cell" in out and "attn: LRs 0.001, 0.003" in out
    assert not (tmp_path / "g").exists()


def test_resume_keeps_finished_runs_and_the_summary_reads_what_is_there(tmp_path, monkeypatch):
    """A run with its final table and its last checkpoint at train.steps is not trained again by --resume; a
    summary of a partly run grid marks the missing cells instead of failing."""
    from rl_lora import grid

    g = expand(str(_grid_file(tmp_path)), [])
    done = g.dir / "full-lr=0.0001-s0"
    (done / "eval").mkdir(parents=True)
    rows = [{"model": "base", "avg_at_k": 0.1, "no_answer": 0.5, "accuracy_given_answer": 0.2},
            {"model": "full-ft@2", "avg_at_k": 0.4, "no_answer": 0.1, "accuracy_given_answer": 0.45}]
    (done / "eval" / "eval_results.json").write_text(json.dumps({"results": rows}))
    (done / "checkpoints" / "step_000002").mkdir(parents=True)
    for f in ("state.json", "trainer_state.pt"):
        (done / "checkpoints" / "step_000002" / f).write_text("{}")
    (done / "checkpoints" / "latest").write_text("step_000002")
    assert grid.finished(done, g.runs["full-lr=0.0001-s0"])
    assert not grid.finished(done, {**g.runs["full-lr=0.0001-s0"], "train": {**g.runs["full-lr=0.0001-s0"]["train"],
                                                                             "steps": 3}})
    started = []
    monkeypatch.setattr(grid.subprocess, "run", lambda cmd, **kw: started.append(cmd[cmd.index("train") + 1]) or
                        subprocess.CompletedProcess(cmd, 0))
    grid.run_all(g, resume=True, overwrite=False, quiet=True)
    assert [Path(c).stem for c in started] == ["lora", "full-lr=0.0001-s1", "full-lr=0.0001-s2"]
    cells, base = grid.cell_results(g)
    assert base["avg_at_k"] == 0.1 and [c["accuracy"] for c in cells if c["run"] == done.name] == [0.4]
    assert sum(c["accuracy"] is None for c in cells) == len(cells) - 1


def test_the_committed_experiments_expand_and_read_existing_cells():
    """experiments/: every grid file expands (its runs' configs pass the run's checks), and every question's
    variants exist in the shared cell grids it reads."""
    import ast

    from rl_lora.grid import expand

    cells = {}
    for f in sorted((ROOT / "experiments").glob("*/*.yaml")):
        g = expand(str(f), [])
        assert g.cells, f
        if f.parent.name == "cells":
            cells.update({v.name: f.stem for v in g.variants})
    assert cells
    for run in sorted((ROOT / "experiments").glob("*/run.py")):
        tree = ast.parse(run.read_text())
        names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", "") == "NAMES" for t in n.targets)]
        for node in names:
            missing = set(ast.literal_eval(node)) - set(cells)
            assert not missing, f"{run}: {missing} not in experiments/cells/"
