"""Holdout evaluation: the base model and any number of adapters, k samples per problem, in one vLLM engine.

Metrics per (model, eval set), all from the same k samples per problem:

- avg@k: mean accuracy over all samples (= pass@1). The number to compare runs by.
- pass@j, j = 1..k: the unbiased estimator of Chen et al. 2021 (Codex), 1 - C(n-c, j)/C(n, j) per problem with n
  samples of which c are correct, computed as a product so no huge binomial is formed; averaged over problems.
- maj@k: majority vote over the extracted final answers. Samples without an answer do not vote. Answers the
  verifier marked correct are one vote cluster (they are all equivalent to the reference); other answers are
  grouped by their text with whitespace removed. Ties are counted fractionally: a problem whose top clusters
  tie scores the share of them that is correct (the expected score of a uniformly random tie-break), so the
  result does not depend on sample order.
- 95% intervals: percentile bootstrap over problems (seeded), for avg@k, pass@k and maj@k. On AIME (30
  problems) the interval is typically +-0.1 wide: differences smaller than that are noise. For adapters,
  delta_avg is the paired difference to the base model on the same problems, with a paired bootstrap interval.
- length_mean (completion tokens), truncated (share that hit max_tokens), no_answer (share with no extractable
  answer), timeouts / errors (verifier calls that hit the wall-clock limit or failed; they score 0).

Two entry points: `run_eval` (the `rl-lora eval` command: builds the engine, pushes every adapter with
`evict_older=False`, one multi-LoRA generate call, writes JSON / Markdown / PNG) and `eval_live` (the training
loop's periodic eval on the live adapter through the running sampler; returns `eval/...` metrics).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rl_lora.config import ConfigError, DataConfig

BOOTSTRAP_RESAMPLES = 2000  # percentile-interval endpoints move < 0.005 between seeds at this count (AIME, k=16)
LIVE_EVAL_SEED = 7_000_000  # fixed request seeds: every in-training eval sees the same random numbers (paired)
# Adapter versions pushed by `run_eval`: a range of their own, never reused in this process. A reused version is
# a reused vLLM LoRA name, and vLLM's prefix cache (keyed by name) would serve KV computed by the old adapter.
_EVAL_VERSIONS = itertools.count(1_000_001)


# ----------------------------------------------------------------------------------------------------------
# Metrics: pure functions of per-sample outcomes


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased P(at least one of k samples is correct), from n samples with c correct.

    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)   (Chen et al. 2021, numerically stable form).
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def vote_key(answer: str | None) -> str | None:
    """The text an answer votes with: whitespace removed (so '\\frac{1}{2}' and '\\frac {1}{2}' agree)."""
    if answer is None:
        return None
    key = "".join(str(answer).split())
    return key or None


def majority_vote(answers_K: list[str | None], correct_K: list[float]) -> float:
    """maj@k of one problem: 1 if the most common answer is correct, with ties counted fractionally.

    Answers marked correct form one cluster (all are equivalent to the reference); other answers are grouped
    by `vote_key`. None (no extractable answer) does not vote; no votes at all scores 0. If m clusters tie
    for the most votes, the score is (correct clusters among them) / m.
    """
    if len(answers_K) != len(correct_K):
        raise ValueError("majority_vote: one correctness value per answer")
    keys = [vote_key(a) for a in answers_K]
    # A text verified correct once is correct (another sample with the same text may have timed out).
    correct_keys = {k for k, c in zip(keys, correct_K) if k is not None and c > 0}
    counts: dict[tuple[bool, str], int] = {}
    for key in keys:
        if key is None:
            continue
        cluster = (True, "") if key in correct_keys else (False, key)
        counts[cluster] = counts.get(cluster, 0) + 1
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [cluster for cluster, n in counts.items() if n == top]
    return sum(is_correct for is_correct, _ in tied) / len(tied)


def bootstrap_ci(values_P, *, seed: int, level: float = 0.95,
                 num_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem values (problems resampled with replacement)."""
    import numpy as np

    values = np.asarray(values_P, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of per-problem values")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(num_resamples, values.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarise(correct_PK: list[list[float]], answers_PK: list[list[str | None]], lengths_PK: list[list[int]],
              truncated_PK: list[list[bool]], *, timeouts: int = 0, errors: int = 0, seed: int = 0) -> dict:
    """Every metric of one (model, eval set) from per-sample outcomes. `correct` is 1.0/0.0 per sample."""
    num_problems = len(correct_PK)
    if num_problems == 0:
        raise ValueError("summarise: no problems")
    k = len(correct_PK[0])
    if k == 0 or any(len(row) != k for row in correct_PK):
        raise ValueError("summarise: every problem needs the same number (>= 1) of samples")
    num_correct_P = [sum(1 for c in row if c > 0) for row in correct_PK]
    acc_P = [c / k for c in num_correct_P]
    pass_PJ = [[pass_at_k(k, c, j) for j in range(1, k + 1)] for c in num_correct_P]
    maj_P = [majority_vote(a, c) for a, c in zip(answers_PK, correct_PK)]
    samples = num_problems * k
    return {
        "problems": num_problems,
        "k": k,
        "avg_at_k": sum(acc_P) / num_problems,
        "avg_at_k_ci95": bootstrap_ci(acc_P, seed=seed),
        # pass_at_k[j - 1] = pass@j
        "pass_at_k": [sum(row[j] for row in pass_PJ) / num_problems for j in range(k)],
        "pass_at_k_ci95": bootstrap_ci([row[-1] for row in pass_PJ], seed=seed),
        "maj_at_k": sum(maj_P) / num_problems,
        "maj_at_k_ci95": bootstrap_ci(maj_P, seed=seed),
        "length_mean": sum(map(sum, lengths_PK)) / samples,
        "truncated": sum(map(sum, truncated_PK)) / samples,
        "no_answer": sum(a is None for row in answers_PK for a in row) / samples,
        "timeouts": int(timeouts),
        "errors": int(errors),
        "correct_per_problem": num_correct_P,  # for paired comparisons between models
    }


def paired_delta(correct_a_P: list[int], correct_b_P: list[int], k: int, *, seed: int) -> tuple[float, tuple]:
    """avg@k of a minus that of b on the same problems, with a paired bootstrap 95% interval."""
    diff_P = [(a - b) / k for a, b in zip(correct_a_P, correct_b_P, strict=True)]
    return sum(diff_P) / len(diff_P), bootstrap_ci(diff_P, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Sampling and scoring through a running sampler


def score_groups(groups, problems, scorer, *, seed: int = 0) -> tuple[dict, list[list[float]], list[list]]:
    """Verify every completion (math_answer), extract its answer, summarise.

    Returns (summary, correct_PK, answers_PK). One scorer call per group list, so the verifier's timeout and
    error counts belong to exactly these samples.
    """
    from reward import extract

    k = len(groups[0])
    flat = [(p, c) for p, g in zip(problems, groups, strict=True) for c in g]
    result = scorer.score([p.question for p, _ in flat], [c.text for _, c in flat],
                          [{"answer": p.answer} for p, _ in flat])
    correct = result.per_reward.get("math_answer", result.rewards)
    correct_PK = [[float(x) for x in correct[i * k:(i + 1) * k]] for i in range(len(groups))]
    answers_PK = [[extract(c.text) for c in g] for g in groups]
    summary = summarise(correct_PK, answers_PK, [[len(c.token_ids) for c in g] for g in groups],
                        [[c.finish_reason == "length" for c in g] for g in groups],
                        timeouts=result.timeouts, errors=result.errors, seed=seed)
    return summary, correct_PK, answers_PK


def live_ks(k: int) -> list[int]:
    """pass@j logged during training: powers of two below k, and k itself."""
    return sorted({j for j in (2 ** i for i in range(1, 12)) if j < k} | {k}) if k > 1 else []


def eval_live(sampler, refs_K: list, prompts_P: list[list[int]], problems, scorer, k: int, temperature: float,
              max_tokens: int, *, seed: int = LIVE_EVAL_SEED, top_p: float = 1.0):
    """Held-out metrics of each live adapter in `refs_K` through the running sampler: one dict of `eval/...`
    scalars per adapter.

    k samples per problem at `temperature` (k = 0: one greedy sample). Fixed request seeds, so evaluations
    along a run are paired. `scorer` is a RewardRunner holding the math_answer reward. eval/accuracy is avg@k
    (= pass@1); eval/pass@j for j in `live_ks(k)`; eval/maj@k; the interval is the 95% bootstrap over problems.
    The K adapters of one run are sampled in ONE generate call, with the same request seeds for every adapter
    (paired).
    """
    if not prompts_P:
        return [{} for _ in refs_K]
    n = max(k, 1)
    P = len(prompts_P)
    groups = sampler.generate(prompts_P * len(refs_K), n=n, adapters=[r for r in refs_K for _ in range(P)],
                              seed=seed, temperature=temperature if k else 0.0, max_tokens=max_tokens, top_p=top_p,
                              seeds=[seed + i * n for i in range(P)] * len(refs_K))
    outs = []
    for j in range(len(refs_K)):
        s, _, _ = score_groups(groups[j * P:(j + 1) * P], problems, scorer, seed=seed)
        out = {"eval/accuracy": s["avg_at_k"], "eval/accuracy_ci95_lo": s["avg_at_k_ci95"][0],
               "eval/accuracy_ci95_hi": s["avg_at_k_ci95"][1]}
        out.update({f"eval/pass@{i}": s["pass_at_k"][i - 1] for i in live_ks(n)})
        out[f"eval/maj@{n}"] = s["maj_at_k"]
        out.update({"eval/length_mean": s["length_mean"], "eval/truncated": s["truncated"],
                    "eval/no_answer": s["no_answer"], "eval/timeouts": float(s["timeouts"])})
        outs.append(out)
    return outs


def evaluate_models(sampler, models: list[tuple[str, object]], evalsets, data_cfg: DataConfig, scorer, *, k: int,
                    temperature: float, max_tokens: int, top_p: float = 1.0, seed: int = 0,
                    progress: bool = False, log=None) -> tuple[list[dict], list[dict]]:
    """Every (model, eval set) pair from ONE generate call: prompts under different adapters are batched
    together (multi-LoRA). `models` are (label, AdapterRef or None for the base). Returns (result rows,
    sample rows)."""
    from rl_lora.data import prompt_token_ids

    prompts_E = [[prompt_token_ids(sampler.tokenizer, p, data_cfg) for p in es.problems] for es in evalsets]
    longest = max(len(ids) for prompts in prompts_E for ids in prompts)
    if longest + max_tokens > sampler.max_model_len:
        raise ConfigError(f"--max-tokens: longest prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                          f"engine's context ({sampler.max_model_len}); raise --max-model-len or lower --max-tokens")
    requests = [(m, e, ids) for m in range(len(models)) for e in range(len(evalsets)) for ids in prompts_E[e]]
    t0 = time.perf_counter()
    groups = sampler.generate([ids for _, _, ids in requests], n=k, adapters=[models[m][1] for m, _, _ in requests],
                              seed=seed, temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                              use_tqdm=progress)
    t1 = time.perf_counter()
    rows, sample_rows, start = [], [], 0
    for label, _ in models:
        for es in evalsets:
            mine = groups[start:start + len(es.problems)]
            start += len(es.problems)
            row, correct_PK, answers_PK = score_groups(mine, es.problems, scorer, seed=seed)
            rows.append({"model": label, "dataset": es.name, **row})
            for i, (p, g) in enumerate(zip(es.problems, mine)):
                for j, c in enumerate(g):
                    sample_rows.append({"model": label, "dataset": es.name, "problem": i, "sample": j,
                                        "answer": p.answer, "extracted": answers_PK[i][j],
                                        "correct": correct_PK[i][j], "tokens": len(c.token_ids),
                                        "finish_reason": c.finish_reason, "completion": c.text})
    base = {r["dataset"]: r for r in rows if r["model"] == models[0][0]} if models[0][1] is None else {}
    for r in rows:
        b = base.get(r["dataset"])
        if b is not None and r is not b:
            delta, ci = paired_delta(r["correct_per_problem"], b["correct_per_problem"], k, seed=seed)
            r["delta_avg_vs_base"], r["delta_avg_vs_base_ci95"] = delta, ci
    if log is not None:
        log(f"sampled {len(requests) * k} completions in {t1 - t0:.1f} s, verified in {time.perf_counter() - t1:.1f} s")
    return rows, sample_rows


# ----------------------------------------------------------------------------------------------------------
# The `rl-lora eval` driver


@dataclass
class EvalConfig:
    # Base model: HF name, local HF directory or "smollm2-135m-gguf" (as model.path in a run config).
    model: str
    # PEFT adapter directories (adapter_config.json + adapter_model.safetensors); "label=path" names one.
    adapters: list = field(default_factory=list)
    # Eval sets: aime2024, aime2025, math500, gsm8k, arithmetic, or .jsonl/.parquet paths.
    data: list = field(default_factory=lambda: ["aime2024", "aime2025"])
    # Samples per problem (k of avg@k, pass@k, maj@k), >= 1.
    k: int = 16
    # Sampling temperature (0 = greedy, then k must be 1).
    temperature: float = 0.6
    # Nucleus sampling; 1.0 = off.
    top_p: float = 1.0
    # Completion cap in tokens (8192 for the Qwen3-8B DeepMath recipe; use ~32-256 on CPU).
    max_tokens: int = 8192
    # Seed of the per-request sampling seeds and of the bootstrap.
    seed: int = 0
    # Output directory. "" = <first adapter's parent>/eval, or runs/eval for the base model alone (eval-2, eval-3, ...
    # when that one already holds results).
    out_dir: str = ""
    # Engine dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.
    dtype: str = "auto"
    # Engine context in tokens (prompt + completion). 0 = the model's own limit.
    max_model_len: int = 0
    # vLLM KV cache on CPU, GiB.
    cpu_kvcache_gib: int = 1
    # Fraction of GPU memory for vLLM (GPU only; nothing else shares the GPU during eval).
    gpu_memory_utilization: float = 0.9
    # Tensor-parallel size (GPU only).
    tensor_parallel_size: int = 1
    # Verifier wall-clock limit per completion, seconds; a call over it scores 0 and is counted.
    reward_timeout_s: float = 5.0
    # Verifier worker processes (0 = in-process).
    reward_workers: int = 2
    # Optional data.source of the training data (arithmetic, a file, hf:name) to check eval sets against.
    train_data: str = ""

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"--k: must be >= 1, got {self.k}")
        if self.temperature < 0:
            raise ConfigError("--temperature: must be >= 0")
        if self.temperature == 0 and self.k > 1:
            raise ConfigError("--k: greedy decoding (--temperature 0) gives k identical samples; use --k 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p: must be in (0, 1]")
        if self.max_tokens < 1:
            raise ConfigError("--max-tokens: must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype: auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.reward_timeout_s <= 0 or self.reward_workers < 0:
            raise ConfigError("--reward-timeout-s must be > 0 and --reward-workers >= 0")


def parse_adapters(specs: list[str]) -> list[tuple[str, Path, int]]:
    """'path' or 'label=path' -> (label, path, rank). Checks the PEFT files exist before any model loads."""
    out, labels = [], set()
    for spec in specs:
        label, _, raw = spec.partition("=") if "=" in spec and "/" not in spec.split("=", 1)[0] else ("", "", spec)
        path = Path(raw).expanduser()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (path / name).is_file():
                raise ConfigError(f"--adapter {raw}: no {name} there (expected a PEFT adapter directory)")
        try:
            rank = int(json.loads((path / "adapter_config.json").read_text())["r"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"--adapter {raw}: adapter_config.json has no integer 'r'") from None
        label = label or (path.resolve().parent.name if path.name == "adapter" else path.name)
        base, n = label, 2
        while label in labels or label == "base":
            label, n = f"{base}#{n}", n + 1
        labels.add(label)
        out.append((label, path, rank))
    return out


def run_config_for(adapter: Path) -> Path | None:
    """The config.yaml of the training run an adapter came from (run_dir/adapter, run_dir/checkpoints/s/adapter)."""
    for parent in list(adapter.resolve().parents)[:3]:
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    return None


def eval_data_config(config_path: str | None, overrides: list[str], adapter_specs: list[str],
                     log=print) -> DataConfig:
    """The prompt format and demo-task settings (the `data` section) to evaluate with.

    From `config_path` if given, else from the first adapter's training run (its config.yaml), else the
    defaults; dotted `overrides` (data.max_operand=20) apply on top. Evaluating with the run's own prompt
    format and held-out split is what makes the numbers comparable to its training-time evals.
    """
    from rl_lora.config import load_config

    if config_path is None and adapter_specs:
        found = run_config_for(parse_adapters(adapter_specs[:1])[0][1])
        if found is not None:
            log(f"data settings (prompt format, arithmetic split) from {found}")
            config_path = str(found)
    return load_config(config_path, overrides).data


def default_out_dir(adapters: list[tuple[str, Path, int]]) -> Path:
    """<first adapter's parent>/eval, or eval-2, eval-3, ... when that already holds results: for a training run's
    adapter, eval/ is the run's own end-of-training table, which a later `rl-lora eval` must not overwrite."""
    base = adapters[0][1].resolve().parent / "eval" if adapters else Path("runs/eval")
    out, n = base, 1
    while (out / "eval_results.json").exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def run_eval(cfg: EvalConfig, data_cfg: DataConfig | None = None, *, sampler=None, progress: bool = True,
             log=print) -> dict:
    """Evaluate the base model and every adapter on every eval set with one engine; write the results.

    `sampler`: an already running Sampler for the same base model (tests); else one is built and closed here.
    Returns the results payload (also written as eval_results.json).
    """
    from rl_lora.evaldata import decontamination_report, load_eval_set

    cfg.validate()
    data_cfg = data_cfg or DataConfig()
    # Everything that can fail without a model fails first.
    adapters = parse_adapters(cfg.adapters)
    evalsets = [load_eval_set(name, data_cfg) for name in cfg.data]
    decontamination = {}
    if cfg.train_data:
        import dataclasses

        from rl_lora.data import load_problems

        train, _ = load_problems(dataclasses.replace(data_cfg, source=cfg.train_data))
        for es in evalsets:
            report = decontamination_report([p.question for p in train], [p.question for p in es.problems])
            decontamination[es.name] = asdict(report)
            log(report.warning(es.name) or f"decontamination: none of the {report.eval_size} {es.name} questions "
                                           f"appears in the training data ({cfg.train_data})")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(adapters)

    from reward import RewardRunner

    own_sampler = sampler is None
    if own_sampler:
        sampler = _build_sampler(cfg, adapters)
    scorer = RewardRunner([{"name": "math_answer"}], timeout_s=cfg.reward_timeout_s, num_workers=cfg.reward_workers)
    pushed = []
    try:
        models: list[tuple[str, object]] = [("base", None)]
        for label, path, _ in adapters:
            version = next(v for v in _EVAL_VERSIONS if v not in sampler.live)
            ref = sampler.push(version, lambda d, src=path: shutil.copytree(src, d), evict_older=False)
            pushed.append(ref.version)
            models.append((label, ref))
        t0 = time.perf_counter()
        rows, sample_rows = evaluate_models(sampler, models, evalsets, data_cfg, scorer, k=cfg.k,
                                            temperature=cfg.temperature, max_tokens=cfg.max_tokens, top_p=cfg.top_p,
                                            seed=cfg.seed, progress=progress, log=log)
        elapsed = time.perf_counter() - t0
    finally:
        scorer.close()
        for version in pushed:
            sampler.evict(version)
        if own_sampler:
            sampler.close()
    payload = {
        "config": {**asdict(cfg), "adapters": {label: str(path) for label, path, _ in adapters}},
        "data": {es.name: es.origin for es in evalsets},
        "prompt_format": {"system_prompt": data_cfg.system_prompt, "instruction": data_cfg.instruction},
        "results": rows,
        "decontamination": decontamination,
        "time_s": round(elapsed, 1),
    }
    write_results(out_dir, payload, sample_rows)
    payload["out_dir"] = str(out_dir)
    return payload


def _build_sampler(cfg: EvalConfig, adapters):
    import torch

    from rl_lora.models import resolve_model_path
    from rl_lora.sampler import Sampler

    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    return Sampler(resolve_model_path(cfg.model), dtype=dtype, max_model_len=cfg.max_model_len,
                   max_lora_rank=max((r for _, _, r in adapters), default=1), max_loras=max(len(adapters), 1),
                   kvcache_gib=cfg.cpu_kvcache_gib, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   tensor_parallel_size=cfg.tensor_parallel_size, seed=cfg.seed)


# ----------------------------------------------------------------------------------------------------------
# Reports


def _ci(row: dict, key: str) -> str:
    lo, hi = row[f"{key}_ci95"]
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def format_table(rows: list[dict]) -> str:
    """Markdown table, one line per (eval set, model); readable in a terminal too."""
    k = rows[0]["k"] if rows else 0
    head = ["data", "model", "n", f"avg@{k} [95% CI]", "pass@1", f"pass@{k} [95% CI]", f"maj@{k} [95% CI]",
            "Δavg vs base [95% CI]", "mean len", "truncated", "no answer", "timeouts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in sorted(rows, key=lambda r: r["dataset"]):  # stable: models keep their order within a set
        delta = "—"
        if "delta_avg_vs_base" in r:
            lo, hi = r["delta_avg_vs_base_ci95"]
            delta = f"{r['delta_avg_vs_base']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        cells = [r["dataset"], r["model"], str(r["problems"]), _ci(r, "avg_at_k"), f"{r['pass_at_k'][0]:.3f}",
                 f"{r['pass_at_k'][-1]:.3f} [{r['pass_at_k_ci95'][0]:.3f}, {r['pass_at_k_ci95'][1]:.3f}]",
                 _ci(r, "maj_at_k"), delta, f"{r['length_mean']:.1f}", f"{r['truncated']:.3f}",
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
