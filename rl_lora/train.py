"""The rank-1 GRPO loop: sample -> score -> advantages -> learn -> push, synchronous and on-policy.

Algorithmic choices (and where they come from):
- Groups: each step draws `prompts_per_step` problems and samples `samples_per_prompt` (G) completions of
  each from the vLLM sampler under the live adapter version, at the configured temperature.
- Logprobs: the sampler reports log p of each sampled token under the temperature-scaled distribution
  (`processed_logprobs`); they are the importance-sampling denominator and are never recomputed.
- Advantages: A = r - mean(group) (GRPO without the std division by default, after Dr. GRPO); groups with
  zero reward variance carry no signal and are dropped before the learner (counted in `groups/dropped`).
- Loss: token-level -sum_t min(rho_t, cap) * A / (completion tokens in the step), rho_t = p_learner /
  p_sampler (LoRA Without Regret's objective with truncated IS); `loss.ppo_clip` switches to PPO clipping.
- No KL penalty to a reference model and no entropy bonus (as in nanochat's and the paper's RL setups).
- Update: one AdamW step per batch of rollouts (fully on-policy), gradient-norm clipping.
- Push: the new adapter becomes a new immutable version (new LoRA id and name) in the running engine; the
  old one is evicted. Never merged, never restarted.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from rl_lora import checkpoint
from rl_lora.advantages import group_advantages, has_signal
from rl_lora.config import Config, ConfigError, dump_yaml, to_dict
from rl_lora.data import PromptStream, load_problems, prompt_token_ids
from rl_lora.learner import Learner, TrainSample
from rl_lora.metrics import MetricsLogger, format_step, plot_rewards
from rl_lora.models import resolve_model_path
from rl_lora.rollout import Group


def preflight(cfg: Config, resume: bool) -> Path:
    """Checks that need no model: output dir writable, nothing to overwrite by accident."""
    run_dir = Path(cfg.train.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"train.output_dir: {run_dir} is not writable ({exc.strerror})") from None
    if cfg.sampler.max_loras < 1:
        raise ConfigError("sampler.max_loras: must be >= 1")
    return run_dir


def evaluate(sampler, adapter, prompts_P: list[list[int]], problems, scorer, cfg: Config) -> dict:
    """Held-out metrics of the live adapter (avg@k with its 95% interval, pass@j, maj@k) through the running
    sampler, with fixed request seeds so that evaluations along a run are paired."""
    from rl_lora.evaluate import eval_live

    return eval_live(sampler, adapter, prompts_P, problems, scorer, k=cfg.train.eval_samples,
                     temperature=cfg.sampler.temperature, max_tokens=cfg.sampler.max_tokens, top_p=cfg.sampler.top_p)


def apply_science(cfg: Config, model_path: str) -> tuple[Config, list[str]]:
    """Resolve `optim.lr: auto` with the paper's rule and check the adapter's capacity for the planned run."""
    import dataclasses

    from rl_lora.science import capacity_check, read_shape, suggest_lr

    shape = read_shape(model_path)
    notes = []
    if cfg.optim.lr == "auto":
        s = suggest_lr(shape, steps=cfg.train.steps)
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=s.lora_lr))
        notes.append(f"optim.lr: auto -> {s.lora_lr:.3g} ({s.how})")
    episodes = cfg.train.steps * cfg.train.prompts_per_step * cfg.sampler.samples_per_prompt
    notes.append(capacity_check(shape, cfg.lora.rank, cfg.lora.target_modules, episodes).message())
    return cfg, notes


def final_table(sampler, adapter, problems, scorer, cfg: Config, run_dir: Path, step: int) -> dict:
    """Base model and the trained adapter side by side on the held-out set, in ONE generate call of the running
    engine (multi-LoRA batching; the base rows run without an adapter). Written to run_dir/eval/."""
    from rl_lora.evaldata import EvalSet
    from rl_lora.evaluate import LIVE_EVAL_SEED, evaluate_models, format_table, write_results

    k, temperature = (cfg.train.eval_samples, cfg.sampler.temperature) if cfg.train.eval_samples else (1, 0.0)
    evalset = EvalSet("held-out", problems, f"{cfg.data.source} (held-out, disjoint from training)")
    t0 = time.perf_counter()
    rows, sample_rows = evaluate_models(sampler, [("base", None), (f"adapter@{step}", adapter)], [evalset], cfg.data,
                                        scorer, k=k, temperature=temperature, max_tokens=cfg.sampler.max_tokens,
                                        top_p=cfg.sampler.top_p, seed=LIVE_EVAL_SEED)
    payload = {"config": {"model": cfg.model.path, "k": k, "temperature": temperature, "top_p": cfg.sampler.top_p,
                          "max_tokens": cfg.sampler.max_tokens, "seed": LIVE_EVAL_SEED,
                          "adapters": {f"adapter@{step}": str(run_dir / "adapter")}},
               "data": {evalset.name: evalset.origin},
               "prompt_format": {"system_prompt": cfg.data.system_prompt, "instruction": cfg.data.instruction},
               "results": rows, "decontamination": {}, "time_s": round(time.perf_counter() - t0, 1)}
    write_results(run_dir / "eval", payload, sample_rows)
    return {"rows": rows, "table": format_table(rows), "dir": str(run_dir / "eval")}


def make_samples(groups: list[Group]) -> list[TrainSample]:
    return [TrainSample(g.prompt_ids, c.token_ids, c.logprobs, a)
            for g in groups for c, a in zip(g.completions, g.advantages_G) if c.token_ids]


def train(cfg: Config, resume: bool = False, quiet: bool = False) -> dict:
    from reward import RewardRunner
    from rl_lora.sampler import Sampler

    run_dir = preflight(cfg, resume)
    train_set, held_out = load_problems(cfg.data)  # data errors before any model loads
    model_path = resolve_model_path(cfg.model.path)
    cfg, notes = apply_science(cfg, model_path)
    for line in notes:
        print(line) if not quiet or "WARNING" in line else None
    scorer = RewardRunner(cfg.reward.rewards, timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers)
    eval_scorer = RewardRunner([{"name": "math_answer"}], timeout_s=cfg.reward.timeout_s,
                               num_workers=min(cfg.reward.num_workers, 1))
    start = checkpoint.latest(run_dir) if resume else None
    if resume and start is None:
        print(f"--resume: no complete checkpoint in {run_dir}/checkpoints, starting from step 0")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    sampler = Sampler(model_path, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len,
                      max_lora_rank=cfg.lora.rank, max_loras=cfg.sampler.max_loras,
                      kvcache_gib=cfg.sampler.cpu_kvcache_gib,
                      gpu_memory_utilization=cfg.sampler.gpu_memory_utilization,
                      tensor_parallel_size=cfg.sampler.tensor_parallel_size, seed=cfg.train.seed)
    try:
        tok = sampler.tokenizer
        train_prompts = [prompt_token_ids(tok, p, cfg.data) for p in train_set]
        eval_prompts = [prompt_token_ids(tok, p, cfg.data) for p in held_out]
        longest = max(len(x) for x in train_prompts + eval_prompts)
        if longest + cfg.sampler.max_tokens > sampler.max_model_len:
            raise ConfigError(f"sampler.max_tokens: longest prompt ({longest} tokens) + max_tokens "
                              f"({cfg.sampler.max_tokens}) exceeds the context ({sampler.max_model_len}); "
                              "raise model.max_model_len or shorten prompts")
        learner = Learner(model_path, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                          lr=cfg.optim.lr, lora_plus_ratio=cfg.lora.lora_plus_ratio,
                          betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay,
                          grad_clip=cfg.optim.grad_clip, dtype=cfg.model.dtype,
                          tokens_per_microbatch=cfg.optim.tokens_per_microbatch,
                          temperature=cfg.sampler.temperature, seed=cfg.train.seed)
        state = checkpoint.load(start, learner) if start else {"step": 0, "data_position": 0, "version": 0}
        step, version = state["step"], state["version"] + 1
        stream = PromptStream(len(train_set), cfg.train.seed, state["data_position"])
        logger = MetricsLogger(run_dir, cfg.train.wandb_project, to_dict(cfg), resume=start is not None)
        adapter = sampler.push(version, learner.write_adapter)
        summary = {"trainable_parameters": learner.num_trainable()}
        if start is None and cfg.train.eval_every and held_out:  # step 0 of the eval curve
            before = evaluate(sampler, adapter, eval_prompts, held_out, eval_scorer, cfg)
            logger.log(0, before)
            summary["eval_before"] = before
        bar = tqdm(range(step, cfg.train.steps), initial=step, total=cfg.train.steps, desc="train",
                   disable=quiet, dynamic_ncols=True)
        for step in bar:
            step_num = step + 1
            t0 = time.perf_counter()
            # 1. sample G completions per prompt under the live adapter
            idx_P = stream.next(cfg.train.prompts_per_step)
            completions = sampler.generate(
                [train_prompts[i] for i in idx_P], n=cfg.sampler.samples_per_prompt, adapters=adapter,
                seed=(cfg.train.seed * 1_000_003 + step_num) * 10_000, temperature=cfg.sampler.temperature,
                max_tokens=cfg.sampler.max_tokens, top_p=cfg.sampler.top_p, top_k=cfg.sampler.top_k)
            groups = [Group(i, train_set[i].question, train_prompts[i], c) for i, c in zip(idx_P, completions)]
            t1 = time.perf_counter()
            # 2. score every completion (wall-clock limited; failures score 0 and are counted)
            flat = [(g, c) for g in groups for c in g.completions]
            result = scorer.score([g.prompt for g, _ in flat], [c.text for _, c in flat],
                                  [{"answer": train_set[g.problem_index].answer, **train_set[g.problem_index].fields}
                                   for g, _ in flat])
            G = cfg.sampler.samples_per_prompt
            for j, g in enumerate(groups):
                g.rewards_G = result.rewards[j * G:(j + 1) * G]
            t2 = time.perf_counter()
            # 3. group-centred advantages; zero-variance groups carry no signal
            kept = []
            for g in groups:
                rewards_G = torch.tensor(g.rewards_G)
                if has_signal(rewards_G):
                    g.advantages_G = group_advantages(rewards_G, cfg.loss.scale_by_std).tolist()
                    kept.append(g)
            # 4. learn: one on-policy AdamW step over all kept completions
            samples = make_samples(kept)
            learn = learner.train_step(samples, cfg.loss.is_cap, cfg.loss.ppo_clip) if samples else {}
            t3 = time.perf_counter()
            # 5. push the new adapter version into the running sampler (new id, old one evicted)
            if samples and not learn.get("loss/skipped"):
                version += 1
                adapter = sampler.push(version, learner.write_adapter)
            t4 = time.perf_counter()
            correct = result.per_reward.get("math_answer", result.rewards)
            lengths = [len(c.token_ids) for _, c in flat]
            m = {"reward/mean": sum(result.rewards) / len(flat), "reward/accuracy": sum(correct) / len(flat),
                 "reward/timeouts": float(result.timeouts), "reward/errors": float(result.errors),
                 "response/length_mean": sum(lengths) / len(lengths),
                 "response/truncated": sum(c.finish_reason == "length" for _, c in flat) / len(flat),
                 "groups/total": float(len(groups)), "groups/kept": float(len(kept)),
                 "groups/dropped": float(len(groups) - len(kept)), "adapter/version": float(version),
                 "time/sample": t1 - t0, "time/score": t2 - t1, "time/learn": t3 - t2, "time/push": t4 - t3,
                 "time/step": t4 - t0, **learn}
            if cfg.train.eval_every and step_num % cfg.train.eval_every == 0 and step_num < cfg.train.steps:
                m.update(evaluate(sampler, adapter, eval_prompts, held_out, eval_scorer, cfg))
            logger.log(step_num, m)
            logger.log_samples(step_num, [(g.prompt, c.text, r) for g in groups[:2]
                                          for c, r in zip(g.completions[:2], g.rewards_G[:2])])
            bar.write(format_step(step_num, m)) if not quiet else None
            if (cfg.train.save_every and step_num % cfg.train.save_every == 0) or step_num == cfg.train.steps:
                checkpoint.save(run_dir, step_num, learner,
                                {"data_position": stream.position, "version": version})
        bar.close()
        learner.write_adapter(run_dir / "adapter")
        if held_out:
            final = final_table(sampler, adapter, held_out, eval_scorer, cfg, run_dir, cfg.train.steps)
            trained = final["rows"][1]
            logger.log(cfg.train.steps, {"eval/accuracy": trained["avg_at_k"],
                                         "eval/accuracy_ci95_lo": trained["avg_at_k_ci95"][0],
                                         "eval/accuracy_ci95_hi": trained["avg_at_k_ci95"][1],
                                         "eval/base_accuracy": final["rows"][0]["avg_at_k"]})
            summary["eval_table"], summary["eval_dir"] = final["table"], final["dir"]
        logger.close()
        summary["plot"] = str(plot_rewards(run_dir))
        summary["run_dir"] = str(run_dir)
        return summary
    finally:
        scorer.close()
        eval_scorer.close()
        sampler.close()
