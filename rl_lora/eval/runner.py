"""Sampling and scoring through a running sampler: every (model, eval set) pair in one generate call, verified
with the math_answer reward and summarised by `rl_lora.eval.metrics`.

`eval_live` is the training loop's periodic eval of the live adapter(s) (returns `eval/...` scalars);
`evaluate_models` is the base-vs-adapters table of `rl-lora eval` and of the end of training.
"""

from __future__ import annotations

import time

from rl_lora.config import ConfigError, DataConfig
from rl_lora.eval.metrics import paired_delta, summarise
from rl_lora.seeds import request_seeds

LIVE_EVAL_SEED = 7_000_000  # fixed request seeds: every in-training eval sees the same random numbers (paired)


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
              max_tokens: int, *, seed: int = LIVE_EVAL_SEED, top_p: float = 1.0, stop: list[str] | None = None):
    """Held-out metrics of each live adapter in `refs_K` through the running sampler: one dict of `eval/...`
    scalars per adapter.

    k samples per problem at `temperature` (k = 0: one greedy sample). Fixed request seeds, so evaluations
    along a run are paired. `scorer` is a RewardRunner holding the math_answer reward. eval/accuracy is avg@k
    (= pass@1); eval/pass@j for j in `live_ks(k)`; eval/maj@k; the interval is the 95% bootstrap over problems.
    The K adapters of one run are sampled in ONE generate call, with the same request seeds for every adapter
    (paired).
    """
    refs = refs_K
    if not prompts_P:
        return [{} for _ in refs]
    n = max(k, 1)
    P = len(prompts_P)
    groups = sampler.generate(prompts_P * len(refs), n=n, adapters=[r for r in refs for _ in range(P)], seed=seed,
                              temperature=temperature if k else 0.0, max_tokens=max_tokens, top_p=top_p,
                              seeds=request_seeds(seed, P, n) * len(refs), stop=stop)
    outs = []
    for j in range(len(refs)):
        s, _, _ = score_groups(groups[j * P:(j + 1) * P], problems, scorer, seed=seed)
        out = {"eval/accuracy": s["avg_at_k"], "eval/accuracy_ci95_lo": s["avg_at_k_ci95"][0],
               "eval/accuracy_ci95_hi": s["avg_at_k_ci95"][1]}
        out.update({f"eval/pass@{i}": s["pass_at_k"][i - 1] for i in live_ks(n)})
        out[f"eval/maj@{n}"] = s["maj_at_k"]
        out.update({"eval/length_mean": s["length_mean"], "eval/truncated": s["truncated"],
                    "eval/no_answer": s["no_answer"], "eval/timeouts": float(s["timeouts"])})
        if s["accuracy_given_answer"] is not None:
            out["eval/accuracy_given_answer"] = s["accuracy_given_answer"]
        outs.append(out)
    return outs


def evaluate_models(sampler, models: list[tuple[str, object]], evalsets, data_cfg: DataConfig, scorer, *, k: int,
                    temperature: float, max_tokens: int, top_p: float = 1.0, seed: int = 0,
                    progress: bool = False, log=None, stop: list[str] | None = None) -> tuple[list[dict], list[dict]]:
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
                              use_tqdm=progress, stop=stop)
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
