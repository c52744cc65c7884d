"""The rank-1 GRPO loop: sample -> score -> advantages -> learn -> push; synchronous and on-policy by default.

Algorithmic choices (and where they come from):
- Groups: each step draws `prompts_per_step` problems and samples `samples_per_prompt` (G) completions of
  each from the vLLM sampler under the live adapter version, at the configured temperature.
- Logprobs: the sampler reports log p of each sampled token under the temperature-scaled distribution
  (`processed_logprobs`); they are the importance-sampling denominator and are never recomputed. With
  `sampler.top_p` / `top_k` they are those of the truncated distribution, and the learner scores the same
  truncation (rl_lora/truncation.py), so rho = 1 on-policy; the push-check probe samples with the same settings.
- Advantages: A = r - mean(group) (GRPO without the std division by default, after Dr. GRPO); groups with
  zero reward variance carry no signal and are dropped before the learner (counted in `groups/dropped`).
- Loss: token-level -sum_t min(rho_t, cap) * A / (completion tokens in the step), rho_t = p_learner /
  p_sampler (LoRA Without Regret's objective with truncated IS), rho computed in log space; `loss.ppo_clip`
  switches to PPO clipping, with `loss.is_cap` as its dual-clip bound.
- No KL penalty to a reference model and no entropy bonus (as in nanochat's and the paper's RL setups).
- Update: one AdamW step per batch of rollouts (fully on-policy), gradient-norm clipping.
- Asynchronous (`train.max_staleness` = m >= 1): the requests of the next m steps are in flight while a step is
  learned, each under the version live when submitted, so data is at most m versions old (checked every step,
  logged as `async/staleness`); truncated IS with the sampler's own logprobs corrects for the lag.
- Scale: `sampler.num_engines` > 1 runs the engines as Ray actors (rl_lora/fleet.py); under torchrun the
  learner is data-parallel, one all-reduce of the adapter gradients per step (rl_lora/distributed.py).
- Push: the new adapter becomes a new immutable version (new LoRA id and name) in the running engine; the
  old one is evicted. Never merged, never restarted.
- K adapters (`adapters:`, `rl-lora sweep`): adapters on the same data get the same prompts with the same
  request seeds (paired); all K x P groups are sampled in one generate call (multi-LoRA), learned in one
  forward/backward per micro-batch (each adapter its own optimizer and LR), and all K are pushed as new versions
  each step. Tenants: an adapter may bring its own `data` (its own prompt stream, held-out set and eval table)
  and `rewards` (its completions scored by its own reward runner).

Reliability (each behaviour has a test in tests/faults/):
- After every push, every engine's logprobs on a fixed probe must match the learner's for the new version
  (`train.push_check_tol`) and be much closer to it than to the previous version, else the run stops: it would
  be training on a stale or wrong policy.
- A step whose loss or gradient is not finite leaves adapter and optimizer untouched; `train.max_skipped_steps`
  such steps in a row stop the run.
- A sampler engine (or Ray actor) that dies is rebuilt with the live adapter versions and its unfinished
  prompts are submitted again: no step lost, no prompt scored twice.
- A completion whose reward call failed or timed out (exception, non-number, over `reward.timeout_s`) has no
  score: it is left out of its group's advantages and of the loss (not trained as a genuine 0), and a group with
  fewer than 2 scored completions is dropped (`reward/failed_completions`, `groups/dropped_reward_failure`). A step
  in which no completion could be scored carries no signal; `reward.max_failed_steps` in a row stop the run (a
  broken reward should not burn a cluster for hours).
- Checkpoints are atomic and fsynced; a killed process resumes from the last complete one, and metrics logged
  after it are dropped on resume, so no step is counted twice.
- Run folders (rl_lora/rundir.py): a fresh run refuses a `train.output_dir` holding another run's results
  (--resume continues it; --overwrite moves its files to `<output_dir>.old-<UTC time>` beside it, deleting
  nothing). `--resume` refuses a changed model or adapter shape (rank, alpha, target modules, adapter names,
  full vs LoRA) with a one-line diff; changed optimizer settings (lr, LoRA+ ratio, betas, weight decay) apply
  from the next step, are printed, and the checkpoint's AdamW moments are kept.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rl_lora import checkpoint, faults, rundir
from rl_lora.advantages import valid_group_advantages
from rl_lora.checks import check_model, check_rewards
from rl_lora.config import AdapterSpec, Config, ConfigError, adapter_specs, dump_yaml, is_full_finetune, to_dict
from rl_lora.data import PromptStream, load_problems, prompt_token_ids
from rl_lora.learner import Learner
from rl_lora.loss import build_loss
from rl_lora.metrics import MetricsLogger, format_step, plot_rewards
from rl_lora.models import resolve_model_path
from rl_lora.plan import check_fits
from rl_lora.rollout import Group, TrainSample
from rl_lora.sync import Run, RunError, build_fleet, uses_ray, version_of


def preflight(cfg: Config, resume: bool, overwrite: bool = False) -> Path:
    """Checks that need no model: output dir not another run's (unless --resume / --overwrite) and writable,
    enough disk for checkpoints, ray when it is needed."""
    import importlib.util
    import shutil

    check_rewards(cfg)  # importable, callable rewards (before anything is written)
    run_dir = Path(cfg.train.output_dir)
    rundir.check_folder(run_dir, resume, overwrite)  # before anything in the folder changes
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"train.output_dir: {run_dir} is not writable ({exc.strerror})") from None
    if uses_ray(cfg) and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"sampler.num_engines: the engines run as Ray actors here ({cfg.sampler.num_engines} "
                          "engines, or under torchrun), and ray is not installed (pip install 'rl-lora[cluster]')")
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"train.output_dir: only {free / 2**20:.0f} MiB free on the disk of {run_dir}; "
                          f"checkpoints need at least {MIN_FREE_BYTES / 2**20:.0f} MiB")
    return run_dir


MIN_FREE_BYTES = 64 * 2**20  # before the model is known; checked again against the real checkpoint size


def check_disk(run_dir: Path, learner, full_finetune: bool = False) -> None:
    """Adapter + AdamW state (3 copies of the trainable parameters, fp32), kept KEEP+1 times during a save."""
    import shutil

    need = 3 * 4 * learner.num_trainable() * (checkpoint.KEEP + 1) + MIN_FREE_BYTES
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(f"train.output_dir: {free / 2**20:.0f} MiB free on the disk of {run_dir}, checkpoints "
                          f"need ~{need / 2**20:.0f} MiB ({checkpoint.KEEP} kept + 1 being written)")


def tokenize_prompts(cfg: Config, model_path: str, train_set, held_out, data) -> tuple[list, list]:
    """Prompt token ids of the training and held-out problems (chat template), tokenized once with the model's
    own tokenizer before any model loads, and checked: prompt + sampler.max_tokens must fit the context."""
    from transformers import AutoTokenizer

    limit = cfg.model.max_model_len
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        own = json.loads(config_file.read_text()).get("max_position_embeddings")
        if own and (not limit or limit > own):
            if limit:
                raise ConfigError(f"model.max_model_len: {limit} exceeds the model's context ({own} tokens)")
            limit = own
    tok = AutoTokenizer.from_pretrained(model_path)
    train_prompts = [prompt_token_ids(tok, p, data) for p in train_set]
    eval_prompts = [prompt_token_ids(tok, p, data) for p in held_out]
    longest = max(len(ids) for ids in train_prompts + eval_prompts)
    if limit and longest + cfg.sampler.max_tokens > limit:
        raise ConfigError(f"sampler.max_tokens: longest prompt ({longest} tokens) + max_tokens "
                          f"({cfg.sampler.max_tokens}) exceeds the context ({limit}); "
                          "raise model.max_model_len or shorten prompts")
    return train_prompts, eval_prompts


def apply_science(cfg: Config, model_path: str) -> tuple[Config, list[str]]:
    """Resolve `optim.lr: auto` with the paper's rule and check the adapter's capacity for the planned run."""
    from rl_lora.science import capacity_check, read_shape, suggest_lr

    shape = read_shape(model_path)
    notes = []
    auto = [i for i, a in enumerate(cfg.adapters) if a.get("lr") == "auto"]
    if cfg.optim.lr == "auto" or auto:
        s = suggest_lr(shape, steps=cfg.train.steps)
        adapters = [dict(a, lr=s.lora_lr) if i in auto else a for i, a in enumerate(cfg.adapters)]
        lr = s.lora_lr if cfg.optim.lr == "auto" else cfg.optim.lr
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr), adapters=adapters)
        notes.append(f"lr: auto -> {s.lora_lr:.3g} ({s.how})")
    episodes = cfg.train.steps * cfg.train.prompts_per_step * cfg.sampler.samples_per_prompt
    if is_full_finetune(cfg):
        notes.append("lora.rank: full -- full fine-tuning of every weight (the baseline); the engine's weights are "
                     "overwritten in place after every step")
        return cfg, notes
    seen = set()
    for spec in adapter_specs(cfg):
        key = (spec.rank, tuple(spec.target_modules))
        if key not in seen:
            seen.add(key)
            line = capacity_check(shape, spec.rank, spec.target_modules, episodes).message()
            notes.append(line if len(cfg.adapters) < 2 else f"{line} [{spec.name}]")
    return cfg, notes


def final_table(run, names: list[str], dirs: list[Path], refs: list, problems, scorer, cfg: Config, out_dir: Path,
                step: int, data) -> dict:
    """Base model and the trained adapter(s) side by side on the held-out set, written to `out_dir`.

    Adapters: ONE generate call of the running engine (multi-LoRA batching; the base rows run without an
    adapter). Full fine-tuning: the engine holds the trained weights, so the trained model is evaluated first,
    then the original weights are loaded back for the base row (two calls, the same request seeds: still
    paired). `dirs` are the trained weights' directories, one per name; results go to `out_dir`."""
    from rl_lora.evaldata import EvalSet
    from rl_lora.evaluate import LIVE_EVAL_SEED, evaluate_models, format_table, paired_delta, write_results

    k, temperature = (cfg.train.eval_samples, cfg.sampler.temperature) if cfg.train.eval_samples else (1, 0.0)
    evalset = EvalSet("held-out", problems, f"{data.source} (held-out, disjoint from training)")
    kw = dict(k=k, temperature=temperature, max_tokens=cfg.sampler.max_tokens, top_p=cfg.sampler.top_p,
              seed=LIVE_EVAL_SEED)
    labels = [f"{name}@{step}" for name in names]
    t0 = time.perf_counter()
    if run.learner.full_finetune:
        from safetensors.torch import load_file

        trained, trained_samples = evaluate_models(run.fleet, [(labels[0], None)], [evalset], data, scorer, **kw)
        original = {}
        for f in sorted(Path(run.model_path).glob("*.safetensors")):
            original.update(load_file(str(f)))
        run.fleet.load_weights(original)
        rows, sample_rows = evaluate_models(run.fleet, [("base", None)], [evalset], data, scorer, **kw)
        rows, sample_rows = rows + trained, sample_rows + trained_samples
        delta, ci = paired_delta(rows[1]["correct_per_problem"], rows[0]["correct_per_problem"], k, seed=LIVE_EVAL_SEED)
        rows[1]["delta_avg_vs_base"], rows[1]["delta_avg_vs_base_ci95"] = delta, ci
    else:
        models = [("base", None)] + list(zip(labels, refs))
        rows, sample_rows = evaluate_models(run.fleet, models, [evalset], data, scorer, **kw)
    payload = {"config": {"model": cfg.model.path, "k": k, "temperature": temperature, "top_p": cfg.sampler.top_p,
                          "max_tokens": cfg.sampler.max_tokens, "seed": LIVE_EVAL_SEED,
                          "adapters": {label: str(d) for label, d in zip(labels, dirs)}},
               "data": {evalset.name: evalset.origin},
               "prompt_format": {"system_prompt": data.system_prompt, "instruction": data.instruction},
               "results": rows, "decontamination": {}, "time_s": round(time.perf_counter() - t0, 1)}
    write_results(out_dir, payload, sample_rows)
    return {"rows": rows, "table": format_table(rows), "dir": str(out_dir)}


def evaluate_all(run, specs: list[AdapterSpec], tasks: list, scorer, cfg: Config) -> dict:
    """Held-out metrics of every live adapter on its dataset's held-out set (avg@k with its 95% interval, pass@j,
    maj@k) through the running sampler, one generate call per dataset, with fixed request seeds so that
    evaluations along a run are paired. Keys `eval/...` (K = 1) or `<name>/eval/...`."""
    from rl_lora.evaluate import eval_live

    out = {}
    for t in tasks:
        if not t.held_out:
            continue
        outs = eval_live(run.fleet, [run.refs[k] for k in t.adapters], t.eval_prompts, t.held_out, scorer,
                         k=cfg.train.eval_samples, temperature=cfg.sampler.temperature,
                         max_tokens=cfg.sampler.max_tokens, top_p=cfg.sampler.top_p)
        if len(specs) == 1:
            return outs[0]
        out.update({f"{specs[k].name}/{key}": v for k, res in zip(t.adapters, outs) for key, v in res.items()})
    return out


@dataclasses.dataclass
class Scored:
    rewards: list[float]  # weighted sum per completion
    correct: list[float]  # math_answer per completion where it is among the rewards, else the reward
    timeouts: int
    errors: int
    calls: int  # reward calls made (completions x rewards)
    failed: list[bool] = dataclasses.field(default_factory=list)  # per completion: no real score (a call failed)
    metrics: dict = dataclasses.field(default_factory=dict)  # per reward: reward/<name>/{mean,std_in_group,...}


def score_completions(scorers_K: list, flat: list, problems_K: list, names_K: list | None = None) -> Scored:
    """Score the step's completions (adapter-major, as sampled): adapter k's with its own reward runner, against
    its own dataset's problems. Each group's completions are passed as one group (group rewards, metrics); with
    several adapters the per-reward metrics are prefixed with the adapter's name."""
    out = Scored([], [], 0, 0, 0)
    per = len(flat) // len(scorers_K)
    for k, (scorer, problems) in enumerate(zip(scorers_K, problems_K)):
        mine = flat[k * per:(k + 1) * per]
        res = scorer.score([g.prompt for g, _ in mine], [c.text for _, c in mine],
                           [{"answer": problems[g.problem_index].answer, **problems[g.problem_index].fields}
                            for g, _ in mine], group_ids=[id(g) for g, _ in mine])
        prefix = f"{names_K[k]}/" if names_K and len(scorers_K) > 1 else ""
        out.metrics.update({prefix + key: v for key, v in getattr(res, "metrics", {}).items()})
        out.rewards += res.rewards
        out.correct += res.per_reward.get("math_answer", res.rewards)
        out.timeouts, out.errors = out.timeouts + res.timeouts, out.errors + res.errors
        out.calls += len(mine) * len(scorer.specs)
        out.failed += res.failed
    return out


def make_samples(groups: list[Group]) -> list[TrainSample]:
    return [TrainSample(g.prompt_ids, c.token_ids, c.logprobs, a, g.adapter)
            for g in groups for c, a in zip(g.completions, g.advantages_G) if c.token_ids and a is not None]


def assign_advantages(groups: list[Group], scale_by_std: bool) -> tuple[list[Group], int]:
    """Set each group's advantages over its scored completions (None for those whose reward failed); return the
    groups that carry signal and the number dropped because fewer than 2 of their completions were scored."""
    kept, dropped_for_failure = [], 0
    for g in groups:
        valid_G = torch.tensor([not f for f in g.failed_G], dtype=torch.bool)
        advantages_G = valid_group_advantages(torch.tensor(g.rewards_G), valid_G, scale_by_std)
        dropped_for_failure += int(valid_G.sum()) < 2
        if advantages_G is not None:
            g.advantages_G = [None if f else a for a, f in zip(advantages_G.tolist(), g.failed_G)]
            kept.append(g)
    return kept, dropped_for_failure


def make_learner(cfg: Config, model_path: str) -> Learner:
    return Learner(model_path, target_modules=cfg.lora.target_modules, specs=adapter_specs(cfg),
                   betas=(cfg.optim.beta1, cfg.optim.beta2), full_finetune=is_full_finetune(cfg),
                   weight_decay=cfg.optim.weight_decay, grad_clip=cfg.optim.grad_clip, dtype=cfg.model.dtype,
                   tokens_per_microbatch=cfg.optim.tokens_per_microbatch, temperature=cfg.sampler.temperature,
                   top_k=cfg.sampler.top_k, top_p=cfg.sampler.top_p,
                   activation_checkpointing=cfg.optim.activation_checkpointing,
                   share_prompts=cfg.optim.share_prompts, loss=build_loss(cfg.loss))


def follow(cfg: Config, resume: bool) -> dict:
    """A learner rank > 0 under torchrun: the same learner (and checkpoint) as rank 0, learning its shards."""
    from rl_lora import distributed

    distributed.barrier()  # rank 0 has checked the config and resolved (converted) the model
    model_path = resolve_model_path(cfg.model.path)
    cfg, _ = apply_science(cfg, model_path)
    learner = make_learner(cfg, model_path)
    start = checkpoint.latest(Path(cfg.train.output_dir)) if resume else None
    if start:
        checkpoint.load(start, learner)
    distributed.broadcast_parameters(learner.params)
    return {"follower_steps": distributed.follow(learner)}


@dataclasses.dataclass
class Task:
    """A dataset of the run, with the adapters that train on it (one Task unless adapters bring their own data)."""

    name: str
    data: object  # DataConfig
    adapters: list[int]
    train: list
    held_out: list
    train_prompts: list = None
    eval_prompts: list = None
    stream: PromptStream = None


def load_tasks(cfg: Config, specs: list[AdapterSpec]) -> tuple[list[Task], list[int]]:
    """The run's datasets (the run's own first) and each adapter's index among them; data errors surface here,
    before any model loads."""
    tasks, keys, task_of = [], [], []
    for k, spec in enumerate(specs):
        key = json.dumps(dataclasses.asdict(spec.data), sort_keys=True)
        if key not in keys:
            keys.append(key)
            name = "data" if spec.data == cfg.data else f"{spec.name}-data"
            tasks.append(Task(name, spec.data, [], *load_problems(spec.data)))
        task_of.append(keys.index(key))
        tasks[task_of[-1]].adapters.append(k)
    return tasks, task_of


def train(cfg: Config, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict:
    from reward import RewardRunner
    from rl_lora import distributed

    rank, world = distributed.init()
    if rank > 0:
        return follow(cfg, resume)
    run_dir = preflight(cfg, resume, overwrite)
    specs = adapter_specs(cfg)
    tasks, task_of = load_tasks(cfg, specs)  # data errors before any model loads
    model_path = resolve_model_path(cfg.model.path)
    check_model(cfg, model_path)  # output layer, target_modules, sampler settings: before any model loads
    for t in tasks:
        t.train_prompts, t.eval_prompts = tokenize_prompts(cfg, model_path, t.train, t.held_out, t.data)
    cfg, notes = apply_science(cfg, model_path)
    if torch.cuda.is_available():  # the GPU memory plan (`rl-lora plan`): refuse what cannot fit, before any model
        notes.append(check_fits(cfg, model_path).summary())
    for line in notes:
        print(line) if not quiet or "WARNING" in line else None
    start = checkpoint.latest(run_dir) if resume else None
    if resume and start is None:
        print(f"--resume: no complete checkpoint in {run_dir}/checkpoints, starting from step 0")
    for line in rundir.check_resume(cfg, start, len(tasks)) if start else []:
        print(line)
    moved = rundir.move_aside(run_dir) if overwrite else None  # every check without a model has passed
    if moved:
        print(f"--overwrite: the earlier run's files in {run_dir} were moved to {moved}")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    if world > 1:
        distributed.barrier()

    run = Run(cfg, model_path, quiet)
    runners: dict[str, RewardRunner] = {}  # one per distinct reward list; adapters with the same list share it
    leader = None
    try:
        for spec in specs:
            key = json.dumps(spec.rewards, sort_keys=True)
            if key not in runners:
                runners[key] = RewardRunner(spec.rewards, timeout_s=cfg.reward.timeout_s,
                                            num_workers=cfg.reward.num_workers)
        scorers_K = [runners[json.dumps(spec.rewards, sort_keys=True)] for spec in specs]
        runners["eval"] = eval_scorer = RewardRunner([{"name": "math_answer"}], timeout_s=cfg.reward.timeout_s,
                                                     num_workers=min(cfg.reward.num_workers, 1))
        run.fleet = build_fleet(cfg, model_path, say=run.say)
        run.probe_ids = (tasks[0].eval_prompts or tasks[0].train_prompts)[0]
        run.learner = learner = make_learner(cfg, model_path)
        check_disk(run_dir, learner)
        fresh = {"step": 0, "data_position": [0] * len(tasks), "version": 0, "run_id": checkpoint.new_run_id()}
        state = checkpoint.load(start, learner) if start else fresh
        ckpt_state = {"run_id": state.get("run_id", ""), "signature": rundir.run_signature(cfg)}
        if world > 1:
            distributed.broadcast_parameters(learner.params)
            leader = distributed.Leader(learner)
        step, run.version = state["step"], state["version"]
        positions = state["data_position"] if isinstance(state["data_position"], list) else [state["data_position"]]
        for d, (t, position) in enumerate(zip(tasks, positions)):
            t.stream = PromptStream(len(t.train), cfg.train.seed + d, position)
        logger = MetricsLogger(run_dir, cfg.train.wandb_project, to_dict(cfg), resume_step=step if start else None)
        run.push(step)
        summary = {"trainable_parameters": learner.num_trainable(), "adapters": [s.name for s in specs]}
        if start is None and cfg.train.eval_every and any(t.held_out for t in tasks):  # step 0 of the eval curve
            before = evaluate_all(run, specs, tasks, eval_scorer, cfg)
            logger.log(0, before)
            summary["eval_before"] = before
        bar = tqdm(range(step, cfg.train.steps), initial=step, total=cfg.train.steps, desc="train",
                   disable=quiet, dynamic_ncols=True)
        skipped_streak = failed_streak = 0
        for step in bar:
            step_num = step + 1
            t0 = time.perf_counter()
            # 1. sample G completions per prompt under the live adapter (async: submitted up to max_staleness
            #    steps ahead, under the version live then)
            for ahead in range(step_num, min(step_num + cfg.train.max_staleness, cfg.train.steps) + 1):
                if ahead not in run.in_flight:
                    idx_D = [t.stream.next(cfg.train.prompts_per_step) for t in tasks]
                    run.submit(ahead, idx_D, [[tasks[d].train_prompts[i] for i in idx_D[d]] for d in task_of],
                               [t.stream.position for t in tasks])
            sub, completions = run.collect(step_num)
            P = cfg.train.prompts_per_step
            groups = []
            for j, c in enumerate(completions):  # adapter-major: adapter k's P prompts, then k+1's
                t, i = tasks[task_of[j // P]], sub.idx_D[task_of[j // P]][j % P]
                groups.append(Group(i, t.train[i].question, t.train_prompts[i], c, adapter=j // P))
            staleness = run.version - min(version_of(c.adapter_version, len(specs), sub.version)
                                          for g in groups for c in g.completions)
            if staleness > cfg.train.max_staleness:
                raise RunError(f"step {step_num} was sampled {staleness} versions behind the learner "
                               f"(train.max_staleness={cfg.train.max_staleness}): a bug in the request pipeline")
            t1 = time.perf_counter()
            # 2. score every completion (wall-clock limited; a failed or timed-out call is counted, and its
            #    completion has no score)
            flat = [(g, c) for g in groups for c in g.completions]
            result = score_completions(scorers_K, flat, [tasks[d].train for d in task_of], [s.name for s in specs])
            G = cfg.sampler.samples_per_prompt
            for j, g in enumerate(groups):
                g.rewards_G = result.rewards[j * G:(j + 1) * G]
                g.failed_G = result.failed[j * G:(j + 1) * G]
            every_call = result.timeouts + result.errors >= result.calls
            failed_streak = failed_streak + 1 if every_call or all(result.failed) else 0
            if cfg.reward.max_failed_steps and failed_streak >= cfg.reward.max_failed_steps:
                what = "every reward call failed or timed out" if every_call else \
                    "every completion had a failed or timed-out reward call"
                raise RunError(f"{what} in {failed_streak} steps in a row (last: step {step_num}; {result.timeouts} "
                               f"timeouts, {result.errors} errors of {result.calls} calls): the reward is broken; fix "
                               "it (or raise reward.timeout_s) and --resume")
            t2 = time.perf_counter()
            # 3. group-centred advantages over the scored completions; zero-variance groups carry no signal
            kept, dropped_for_failure = assign_advantages(groups, cfg.loss.scale_by_std)
            # 4. learn: one AdamW step over all kept completions (sharded over the learner ranks under torchrun)
            samples = make_samples(kept)
            if samples and faults.fire("nan_logprobs", step_num):
                samples[0].sampler_logprobs = [float("nan")] * len(samples[0].sampler_logprobs)
            learn = (leader or learner).train_step(samples) if samples else {}
            t3 = time.perf_counter()
            # 5. push the new adapter version into the running fleet (new id, old one evicted), and check it
            skipped = bool(learn.get("loss/skipped"))
            skipped_streak = skipped_streak + 1 if skipped else 0
            if skipped:
                run.say(f"step {step_num}: non-finite loss or gradient, update skipped (adapter and optimizer "
                        f"unchanged; {skipped_streak} in a row)")
                if cfg.train.max_skipped_steps and skipped_streak >= cfg.train.max_skipped_steps:
                    raise RunError(f"{skipped_streak} steps in a row had a non-finite loss or gradient (last: step "
                                   f"{step_num}); stopping. Adapter and optimizer are those of the last good step; "
                                   "lower optim.lr or check the sampler's logprobs, then --resume")
            probe_gap = run.push(step_num) if samples and not skipped else None
            t4 = time.perf_counter()
            correct = result.correct
            lengths = [len(c.token_ids) for _, c in flat]
            m = {"reward/mean": sum(result.rewards) / len(flat), "reward/accuracy": sum(correct) / len(flat),
                 "reward/timeouts": float(result.timeouts), "reward/errors": float(result.errors),
                 "reward/failed_completions": float(sum(result.failed)),
                 "groups/dropped_reward_failure": float(dropped_for_failure),
                 "response/length_mean": sum(lengths) / len(lengths),
                 "response/truncated": sum(c.finish_reason == "length" for _, c in flat) / len(flat),
                 "groups/total": float(len(groups)), "groups/kept": float(len(kept)),
                 "groups/dropped": float(len(groups) - len(kept)), "adapter/version": float(run.version),
                 "sampler/restarts": float(run.fleet.restarts), "async/staleness": float(staleness),
                 "time/sample": t1 - t0, "time/score": t2 - t1, "time/learn": t3 - t2,
                 "time/push": run.push_s if probe_gap is not None else t4 - t3,
                 "time/push_check": run.check_s if probe_gap is not None else 0.0,
                 "time/push_wait": run.wait_s if probe_gap is not None else 0.0,
                 "time/step": t4 - t0, **result.metrics, **learn}
            if probe_gap is not None:
                m.update(run.probe)  # push/probe_gap, push/probe_gap_prev
            if len(specs) > 1:
                per = len(flat) // len(specs)
                for k, spec in enumerate(specs):
                    mine = range(k * per, (k + 1) * per)
                    m[f"{spec.name}/reward/mean"] = sum(result.rewards[j] for j in mine) / per
                    m[f"{spec.name}/reward/accuracy"] = sum(correct[j] for j in mine) / per
            if cfg.train.eval_every and step_num % cfg.train.eval_every == 0 and step_num < cfg.train.steps:
                m.update(evaluate_all(run, specs, tasks, eval_scorer, cfg))
            logger.log(step_num, m)
            logger.log_samples(step_num, [(g.prompt, c.text, r) for g in groups[:2]
                                          for c, r in zip(g.completions[:2], g.rewards_G[:2])])
            bar.write(format_step(step_num, m)) if not quiet else None
            if (cfg.train.save_every and step_num % cfg.train.save_every == 0) or step_num == cfg.train.steps:
                position = sub.data_position if len(tasks) > 1 else sub.data_position[0]
                checkpoint.save(run_dir, step_num, learner,
                                {"data_position": position, "version": run.version, **ckpt_state})
        bar.close()
        if learner.full_finetune:
            learner.save_model(run_dir / "model")
        else:
            for k in range(len(specs)):
                learner.write_adapter(run_dir / learner.adapter_dirname(k), k)
        weights = "model" if learner.full_finetune else learner.adapter_dirname(0).split("/")[0]
        checkpoint.fsync_tree(run_dir / weights)  # adapter/, adapters/ or model/: on disk before "done"
        checkpoint.fsync_path(run_dir)
        final_m, tables, rows = {}, [], []
        for t in tasks:
            if not t.held_out:
                continue
            if learner.full_finetune:
                names, dirs = ["full-ft"], ["model"]
            else:
                names = ["adapter"] if len(specs) == 1 else [specs[k].name for k in t.adapters]
                dirs = [learner.adapter_dirname(k) for k in t.adapters]
            out_dir = run_dir / "eval" if len(tasks) == 1 else run_dir / "eval" / t.name
            final = final_table(run, names, [run_dir / d for d in dirs], [run.refs[k] for k in t.adapters],
                                t.held_out, eval_scorer, cfg, out_dir, cfg.train.steps, t.data)
            final_m["eval/base_accuracy" if len(tasks) == 1 else f"{t.name}/eval/base_accuracy"] = \
                final["rows"][0]["avg_at_k"]
            for k, trained in zip(t.adapters, final["rows"][1:]):
                prefix = "" if len(specs) == 1 else f"{specs[k].name}/"
                final_m.update({f"{prefix}eval/accuracy": trained["avg_at_k"],
                                f"{prefix}eval/accuracy_ci95_lo": trained["avg_at_k_ci95"][0],
                                f"{prefix}eval/accuracy_ci95_hi": trained["avg_at_k_ci95"][1]})
            tables.append(final["table"] if len(tasks) == 1 else f"[{t.name}: {t.data.source}]\n{final['table']}")
            rows += final["rows"]
        if tables:
            logger.log(cfg.train.steps, final_m)
            summary["eval_table"], summary["eval_rows"] = "\n\n".join(tables), rows
            summary["eval_dir"] = str(run_dir / "eval")
        logger.close()
        summary["plot"] = str(plot_rewards(run_dir))
        summary["run_dir"] = str(run_dir)
        return summary
    finally:
        if leader is not None:
            leader.stop()
        for runner in runners.values():
            runner.close()
        if run.fleet is not None:
            run.fleet.close()
