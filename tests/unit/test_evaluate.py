"""Evaluation: pass@k / maj@k / bootstrap maths, eval-set loaders and decontamination, and base + two adapters
scored by one engine (the session's tiny-model sampler)."""

import itertools
import json
import math
import os
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from rl_lora.config import AdapterSpec, ConfigError, DataConfig
from rl_lora.data import load_problems
from rl_lora.eval.command import EvalConfig, parse_adapters
from rl_lora.eval.metrics import bootstrap_ci, majority_vote, paired_delta, pass_at_k, summarise
from rl_lora.eval.reports import format_table, write_results
from rl_lora.eval.runner import live_ks
from rl_lora.evaldata import HF_EVAL_SETS, decontamination_report, load_eval_set, normalise_question, parse_data_arg

FIXTURE = Path(__file__).parents[1] / "data" / "eval_fixture.jsonl"
REPO = Path(__file__).resolve().parents[2]


def eval_config(**keys) -> EvalConfig:
    """EvalConfig with the given keys; a dict value sets keys of that section (model={"path": "m"})."""
    cfg = EvalConfig()
    cfg.model.path = "m"
    for name, value in keys.items():
        if isinstance(value, dict):
            for k, v in value.items():
                setattr(getattr(cfg, name), k, v)
        else:
            setattr(cfg, name, value)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_enumeration_over_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(1024, 512) ~ 1e306: the naive ratio of binomials overflows a float; the product form does not.
    for n, c, k in [(1024, 1, 512), (1024, 3, 1000), (2000, 7, 1), (2000, 0, 1999)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the plain accuracy


def test_pass_at_k_rejects_impossible_arguments():
    for n, c, k in [(4, 1, 0), (4, 1, 5), (4, 5, 2), (4, -1, 2)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ----------------------------------------------------------------------------------------------------------
# maj@k


def test_majority_vote_clear_winner():
    assert majority_vote(["5", "5", "3"], [1, 1, 0]) == 1.0
    assert majority_vote(["3", "3", "5"], [0, 0, 1]) == 0.0


def test_majority_vote_ties_count_fractionally_and_ignore_order():
    assert majority_vote(["5", "3"], [1, 0]) == 0.5
    assert majority_vote(["1", "1", "2", "2", "3", "3"], [1, 1, 0, 0, 0, 0]) == pytest.approx(1 / 3)
    assert majority_vote(["2", "2", "1", "1", "3"], [0, 0, 1, 1, 0]) == 0.5  # "3" has fewer votes
    answers, correct = ["7", "7", "9", "9", "4", "4"], [1, 1, 0, 0, 0, 0]
    for perm in itertools.permutations(range(6)):
        assert majority_vote([answers[i] for i in perm], [correct[i] for i in perm]) == pytest.approx(1 / 3)


def test_majority_vote_clusters():
    # no answer does not vote; no votes at all scores 0
    assert majority_vote([None, None, "5"], [0, 0, 1]) == 1.0
    assert majority_vote([None, None], [0, 0]) == 0.0
    # differently written correct answers are one cluster (all equal the reference)
    assert majority_vote(["\\frac{1}{2}", "0.5", "3"], [1, 1, 0]) == 1.0
    # whitespace does not split a cluster
    assert majority_vote(["x + 1", "x+1", "2"], [0, 0, 1]) == 0.0
    # a text verified correct once is correct (the other copy's verifier call timed out)
    assert majority_vote(["5", "5", "3"], [1, 0, 0]) == 1.0


# ----------------------------------------------------------------------------------------------------------
# bootstrap intervals


def test_bootstrap_interval_contains_mean_is_seeded_and_shrinks_with_more_problems():
    rng = random.Random(0)
    small = [rng.random() < 0.4 for _ in range(30)]
    large = [rng.random() < 0.4 for _ in range(3000)]
    for values in (small, large):
        lo, hi = bootstrap_ci(values, seed=1)
        assert lo <= sum(values) / len(values) <= hi
        assert 0.0 <= lo < hi <= 1.0
    assert bootstrap_ci(small, seed=1) == bootstrap_ci(small, seed=1)
    assert bootstrap_ci(small, seed=1) != bootstrap_ci(small, seed=2)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(bootstrap_ci(large, seed=1)) < width(bootstrap_ci(small, seed=1)) / 5  # ~1/sqrt(100)
    assert bootstrap_ci([0.5] * 10, seed=0) == (0.5, 0.5)


def test_summarise_and_paired_delta():
    correct = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    answers = [["5", "5", "3", "3"], [None, "2", "2", "1"], ["9", "9", "9", "9"]]
    s = summarise(correct, answers, [[10, 20, 30, 40]] * 3, [[False, False, False, True]] * 3, timeouts=1, seed=0)
    assert s["problems"] == 3 and s["k"] == 4
    assert s["avg_at_k"] == pytest.approx(6 / 12) == pytest.approx(s["pass_at_k"][0])
    assert s["pass_at_k"] == sorted(s["pass_at_k"])  # pass@k grows with k
    assert s["pass_at_k"][-1] == pytest.approx(2 / 3)
    assert s["maj_at_k"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["length_mean"] == 25 and s["truncated"] == 0.25 and s["no_answer"] == pytest.approx(1 / 12)
    assert s["timeouts"] == 1 and s["correct_per_problem"] == [2, 0, 4]
    assert s["accuracy_given_answer"] == pytest.approx(6 / 11)  # one sample gave no answer
    assert summarise([[0]], [[None]], [[1]], [[True]])["accuracy_given_answer"] is None
    lo, hi = s["avg_at_k_ci95"]
    assert lo <= s["avg_at_k"] <= hi
    delta, (dlo, dhi) = paired_delta([4, 2, 4], s["correct_per_problem"], 4, seed=0)
    assert delta == pytest.approx((0.5 + 0.5 + 0) / 3) and dlo <= delta <= dhi
    assert live_ks(16) == [2, 4, 8, 16] and live_ks(6) == [2, 4, 6] and live_ks(1) == []


# ----------------------------------------------------------------------------------------------------------
# eval sets


def test_local_fixture_loads_with_problem_column_and_gsm8k_answers():
    es = load_eval_set(str(FIXTURE))
    assert len(es.problems) == 6
    assert es.problems[0].question == "What is 2 + 3?" and es.problems[0].answer == "5"
    assert es.problems[4].answer == "7"  # '#### 7' reduced by data.py
    assert es.problems[0].fields == {"id": "fx-1"}


def test_local_parquet(tmp_path):
    import datasets

    path = tmp_path / "set.parquet"
    datasets.Dataset.from_list([{"question": "What is 1 + 1?", "answer": 2}]).to_parquet(str(path))
    es = load_eval_set(str(path))
    assert [(p.question, p.answer) for p in es.problems] == [("What is 1 + 1?", "2")]


def test_loader_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    cases = [(str(tmp_path / "missing.jsonl"), "file not found"), (str(bad), "question column"),
             ("aime2023", "unknown eval set"), (str(tmp_path / "x.csv"), "unknown eval set")]
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"problem": "What is 1 + 1?", "solution": "2"}) + "\n")
    cases.append((str(no_answer), "'answer' column"))
    for name, needle in cases:
        with pytest.raises(ConfigError, match=needle) as exc:
            load_eval_set(name)
        assert "\n" not in str(exc.value)


def test_offline_hf_name_gives_one_line_cli_error():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rl_lora.cli", "eval", "--model", "no-such-model",
                           "--data", "aime2024"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rl-lora: error:")]
    assert len(errors) == 1 and "HuggingFaceH4/aime_2024" in errors[0] and "local .jsonl" in errors[0]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]


def test_named_sets_and_arithmetic_held_out():
    assert set(HF_EVAL_SETS) == {"aime2024", "aime2025", "math500", "gsm8k"}
    assert parse_data_arg(" aime2024,aime2025 ,aime2024") == ["aime2024", "aime2025"]
    with pytest.raises(ConfigError):
        parse_data_arg(" , ")
    cfg = DataConfig(max_operand=20, operations="+-", eval_size=16, train_size=600)
    es = load_eval_set("arithmetic", cfg)
    train, held_out = load_problems(cfg)
    assert [p.question for p in es.problems] == [p.question for p in held_out]
    assert decontamination_report([p.question for p in train], [p.question for p in es.problems]).overlap == 0


def test_decontamination_normalised_match():
    eval_q = ["What is $\\frac{1}{2} + x$?", "Find  the AREA of the circle.", "What is 2 + 3?"]
    train_q = ["what is \\frac{1}{2}+x", "find the area of the circle", "What is 2 - 3?", "What is 2 \\, + \\; 3 ?"]
    report = decontamination_report(train_q, eval_q)
    assert report.overlap == 3 and report.eval_size == 3 and report.fraction == 1.0
    assert "3/3" in report.warning("aime2024")
    clean = decontamination_report(["What is 2 - 3?", "What is 23?"], ["What is 2 + 3?"])
    assert clean.overlap == 0 and clean.warning() is None
    assert normalise_question("Let $x = \\left( 1 \\right)$.") == normalise_question("let x=(1)")


# ----------------------------------------------------------------------------------------------------------
# driver pieces that need no engine


def test_config_and_adapter_errors(tmp_path):
    for key, value, needle in [("sampler.samples_per_prompt", 0, "--k: must be >= 1"),
                               ("sampler.temperature", 0.0, "greedy"), ("sampler.top_p", 0.0, r"--top-p: .*got 0\.0"),
                               ("sampler.max_tokens", 0, "--max-tokens"), ("model.dtype", "int8", "--dtype"),
                               ("model.path", "", "--model"), ("reward.timeout_s", 0.0, "--reward-timeout-s")]:
        cfg = eval_config(sampler={"samples_per_prompt": 4})
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ConfigError, match=needle):
            cfg.check()
    eval_config().check()
    with pytest.raises(ConfigError, match="adapter_config.json"):
        parse_adapters([str(tmp_path)])
    for name in ("run_a", "run_b"):
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 1}))
        (tmp_path / name / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    parsed = parse_adapters([str(tmp_path / "run_a" / "adapter"), f"mine={tmp_path / 'run_b' / 'adapter'}",
                             str(tmp_path / "run_a" / "adapter")])
    assert [label for label, _, _ in parsed] == ["run_a", "mine", "run_a#2"]


def test_reports_are_written(tmp_path):
    rows = []
    for model, c in (("base", [[1, 0, 0, 0], [0, 0, 0, 0]]), ("run", [[1, 1, 1, 0], [1, 0, 0, 0]])):
        s = summarise(c, [["1"] * 4, ["2"] * 4], [[5] * 4] * 2, [[False] * 4] * 2)
        rows.append({"model": model, "dataset": "fixture", **s})
    rows[1]["delta_avg_vs_base"], rows[1]["delta_avg_vs_base_ci95"] = paired_delta(
        rows[1]["correct_per_problem"], rows[0]["correct_per_problem"], 4, seed=0)
    payload = {"config": {**eval_config(sampler={"samples_per_prompt": 4}).summary(), "adapters": {"run": "x"}},
               "data": {"fixture": "fixture.jsonl"}, "results": rows, "decontamination": {}, "time_s": 0.0}
    write_results(tmp_path, payload, [{"model": "base", "completion": "x"}])
    assert json.loads((tmp_path / "eval_results.json").read_text())["results"][1]["model"] == "run"
    md = (tmp_path / "eval_results.md").read_text()
    assert "| fixture | run | 2 |" in md and "avg@4" in md and "+0.375" in md
    assert (tmp_path / "pass_at_k.png").stat().st_size > 1000
    assert format_table(rows).count("\n") == 3


OLD_FLAGS = ["--model", "--adapter", "--data", "--k", "--temperature", "--top-p", "--max-tokens", "--seed", "--out",
             "--config", "--train-data", "--dtype", "--max-model-len", "--gpu-memory-utilization",
             "--tensor-parallel-size", "--reward-workers", "--reward-timeout-s", "--quiet"]


def _eval_args(*argv):
    from rl_lora.cli import build_parser

    return build_parser().parse_args(["eval", "--model", "m", *argv])


def test_eval_flag_defaults_are_the_config_dataclass_defaults():
    from rl_lora.eval.command import FLAGS, config_from_args

    cfg = config_from_args(_eval_args())
    expected = EvalConfig()
    expected.model.path = "m"
    assert cfg == expected  # every default comes from EvalConfig, none from argparse
    assert (cfg.k, cfg.sampler.temperature, cfg.sampler.max_tokens, cfg.model.dtype, cfg.sets) == (
        16, 0.6, 8192, "auto", ["aime2024", "aime2025"])  # the eval's own defaults, written once in EvalConfig
    assert EvalConfig().sampler.top_p == 1.0 and len(FLAGS) == len({key for _, key, _, _ in FLAGS})


def test_eval_flags_set_their_config_keys_and_the_cli_surface_is_unchanged():
    from rl_lora.cli import build_parser
    from rl_lora.eval.command import config_from_args

    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    flags = [a.option_strings[0] for a in eval_parser._actions if a.option_strings and a.dest != "help"]
    assert sorted(flags) == sorted(OLD_FLAGS)
    args = _eval_args("--adapter", "x=/a", "--data", "gsm8k", "--k", "3", "--temperature", "1", "--top-p", "0.9",
                      "--max-tokens", "8", "--seed", "5", "--out", "o", "--train-data", "arithmetic", "--dtype",
                      "float32", "--max-model-len", "64", "--gpu-memory-utilization", "0.7", "--tensor-parallel-size",
                      "2", "--reward-workers", "0", "--reward-timeout-s", "2.5", "data.max_operand=20")
    cfg = config_from_args(args)
    assert (cfg.model.path, cfg.model.dtype, cfg.model.max_model_len) == ("m", "float32", 64)
    s = cfg.sampler
    assert (s.samples_per_prompt, s.temperature, s.top_p, s.max_tokens, s.gpu_memory_utilization,
            s.tensor_parallel_size) == (3, 1.0, 0.9, 8, 0.7, 2)
    assert (cfg.reward.num_workers, cfg.reward.timeout_s) == (0, 2.5)
    assert (cfg.adapters, cfg.sets, cfg.seed, cfg.out_dir, cfg.train_data) == (["x=/a"], ["gsm8k"], 5, "o",
                                                                                "arithmetic")
    assert args.overrides == ["data.max_operand=20"]
    with pytest.raises(ConfigError, match=r"^--top-p: must be in \(0, 1\], got 1\.5$"):
        config_from_args(_eval_args("--top-p", "1.5"))


def test_eval_results_config_keeps_its_flat_keys():
    """eval_results.json's `config` is read by users' scripts: composing EvalConfig from sections keeps its keys."""
    assert list(eval_config().summary()) == [
        "model", "adapters", "data", "k", "temperature", "top_p", "max_tokens", "seed", "out_dir", "dtype",
        "max_model_len", "cpu_kvcache_gib", "gpu_memory_utilization", "tensor_parallel_size", "reward_timeout_s",
        "reward_workers", "train_data"]


def test_eval_help_is_instant_and_loads_no_model():
    code = ("import sys; from rl_lora.cli import build_parser\n"
            "try:\n    build_parser().parse_args(['eval', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules and 'vllm' not in sys.modules, 'heavy import on --help'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--adapter" in proc.stdout and "multi-LoRA" in proc.stdout


# ----------------------------------------------------------------------------------------------------------
# one engine: base + two adapters


@pytest.fixture(scope="module")
def two_adapters(tiny_model, tmp_path_factory):
    import torch
    from sample_builders import build_learner

    learner = build_learner(tiny_model, AdapterSpec(lr=1e-2), temperature=1.0)
    root = tmp_path_factory.mktemp("eval-adapters")
    paths = []
    for i, name in enumerate(("run_a", "run_b")):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for m in learner.adapters.values():
                m.lora_B.normal_(0, 0.05)
        learner.write_adapter(root / name / "adapter")
        paths.append(root / name / "adapter")
    return paths


@pytest.mark.slow
def test_base_and_two_adapters_in_one_engine(sampler, two_adapters, tmp_path, monkeypatch):
    from rl_lora.eval.command import run_eval
    from rl_lora.sampling import sampler as sampler_mod

    def no_second_engine(*args, **kwargs):
        raise AssertionError("evaluation started a second vLLM engine")

    monkeypatch.setattr(sampler_mod.Sampler, "__init__", no_second_engine)
    calls = []
    real_generate = sampler.generate

    def spy(prompt_ids_P, **kwargs):
        groups = real_generate(prompt_ids_P, **kwargs)
        calls.append((kwargs["adapters"], groups))
        return groups

    monkeypatch.setattr(sampler, "generate", spy)
    cfg = eval_config(model={"path": "unused"}, adapters=[str(p) for p in two_adapters], sets=[str(FIXTURE)],
                      sampler={"samples_per_prompt": 3, "temperature": 1.0, "max_tokens": 8},
                      out_dir=str(tmp_path / "out"), reward={"num_workers": 0})
    before = set(sampler.live)
    payload = run_eval(cfg, sampler=sampler, progress=False, log=lambda *_: None)

    assert len(calls) == 1, "all models must share one generate call (multi-LoRA batching)"
    adapters, groups = calls[0]
    versions = sorted({a.version for a in adapters if a is not None})
    assert None in adapters and len(versions) == 2
    for ref, group in zip(adapters, groups):  # each group was served by its own adapter
        assert all(c.adapter_version == (0 if ref is None else ref.version) for c in group)
    assert set(sampler.live) == before  # the evaluation's adapters were evicted again

    rows = {r["model"]: r for r in payload["results"]}
    assert list(rows) == ["base", "run_a", "run_b"]
    for label, r in rows.items():
        assert r["dataset"] == str(FIXTURE) and r["problems"] == 6 and r["k"] == 3 and len(r["pass_at_k"]) == 3
        assert 0 < r["length_mean"] <= 8 and 0 <= r["avg_at_k"] <= 1 and r["timeouts"] == 0
        assert ("delta_avg_vs_base" in r) == (label != "base")
    out = Path(payload["out_dir"])
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 6 * 3
    assert {"eval_results.json", "eval_results.md", "pass_at_k.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.slow
def test_eval_live_on_the_running_sampler(sampler, two_adapters):
    import shutil

    from reward import RewardRunner
    from rl_lora.data import prompt_token_ids
    from rl_lora.eval.runner import eval_live

    problems = load_eval_set(str(FIXTURE)).problems
    prompts = [prompt_token_ids(sampler.tokenizer, p, DataConfig()) for p in problems]
    version = 9001
    ref = sampler.push(version, lambda d: shutil.copytree(two_adapters[0], d), evict_older=False)
    scorer = RewardRunner([{"name": "math_answer"}], num_workers=0)
    try:
        (m,) = eval_live(sampler, [ref], prompts, problems, scorer, k=4, temperature=1.0, max_tokens=8)
        assert {"eval/accuracy", "eval/pass@2", "eval/pass@4", "eval/maj@4", "eval/length_mean",
                "eval/truncated", "eval/timeouts", "eval/accuracy_ci95_lo", "eval/accuracy_ci95_hi"} <= set(m)
        assert all(k.startswith("eval/") and isinstance(v, float) for k, v in m.items())
        assert [m] == eval_live(sampler, [ref], prompts, problems, scorer, k=4, temperature=1.0, max_tokens=8)
        (greedy,) = eval_live(sampler, [ref], prompts, problems, scorer, k=0, temperature=1.0, max_tokens=8)
        assert "eval/maj@1" in greedy and "eval/pass@2" not in greedy
    finally:
        scorer.close()
        sampler.evict(version)


def test_default_out_dir_never_overwrites_earlier_results(tmp_path):
    """`rl-lora eval --adapter RUN/adapter` without --out writes beside the adapter; RUN/eval/ already holds the
    training run's own base-vs-adapter table, which must survive a later eval."""
    from rl_lora.eval.command import default_out_dir

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    adapters = [("run", tmp_path / "run" / "adapter", 1)]
    assert default_out_dir(adapters) == (tmp_path / "run" / "eval").resolve()  # a fresh run dir: eval/
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "eval_results.json").write_text("{}")
    assert default_out_dir(adapters) == (tmp_path / "run" / "eval-2").resolve()
    (tmp_path / "run" / "eval-2").mkdir()
    (tmp_path / "run" / "eval-2" / "eval_results.json").write_text("{}")
    assert default_out_dir(adapters) == (tmp_path / "run" / "eval-3").resolve()
