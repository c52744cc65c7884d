"""The rank-1 GRPO loop: sample -> score -> advantages -> learn -> push; synchronous and on-policy by default.

`train` is the algorithm only; `Session` owns setup and teardown (checks, resources, the resume point); the
stages' pure helpers are in rl_lora/loop.py, what is trained (adapters or the full model) in rl_lora/policy.py,
the loss in rl_lora/loss.py (chosen once from the config), the learner's packing and sharding in
rl_lora/learner/batching.py.

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
- Scale: `sampler.num_engines` > 1 runs the engines as Ray actors (rl_lora/sampling/fleet.py); under torchrun the
  learner is data-parallel, one all-reduce of the adapter gradients per step (rl_lora/learner/distributed.py).
- Push: the new adapter becomes a new immutable version (new LoRA id and name) in the running engine; the
  old one is evicted. Never merged, never restarted.
- K adapters (`adapters:`, `rl-lora sweep`, `rl-lora grid`): adapters on the same data and sample seed share a
  prompt stream and request seeds (paired); another `sample_seed` is an independent replicate (its own prompt
  order and request seeds; rl_lora/grid.py). All K x P groups are sampled in one generate call (multi-LoRA),
  learned in one forward/backward per micro-batch (each adapter its own optimizer and LR), and all K are pushed as
  new versions each step. Tenants: an adapter may bring its own `data` (its own prompt stream, held-out set and
  eval table) and `rewards` (its completions scored by its own reward runner).

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

from rl_lora import atomic, checkpoint, faults, rundir
from rl_lora.checks import check_model, check_rewards
from rl_lora.config import Config, ConfigError, adapter_specs, dump_yaml, is_full_finetune, run_specs, to_dict
from rl_lora.data import PromptStream, load_problems, prompt_token_ids
from rl_lora.learner.learner import Learner
from rl_lora.loop import (
    Streak,
    assemble_groups,
    assign_advantages,
    check_learned,
    check_scored,
    check_staleness,
    is_due,
    loaded_position,
    make_samples,
    saved_position,
    score_completions,
    staleness,
    step_metrics,
    with_names,
)
from rl_lora.loss import build_loss
from rl_lora.metrics import MetricsLogger, format_step, plot_rewards
from rl_lora.models import resolve_model_path
from rl_lora.plan import check_fits
from rl_lora.policy import Adapters, FullModel
from rl_lora.sync import Run, build_fleet, uses_ray


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


def check_disk(run_dir: Path, learner) -> None:
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
    from rl_lora.science import SCALARS_LR, capacity_check, measured_lrs, read_shape, suggest_lr

    shape = read_shape(model_path)
    notes = []
    specs = adapter_specs(cfg)
    auto = [i for i, a in enumerate(cfg.adapters) if a.lr == "auto"]
    if cfg.optim.lr == "auto" or auto:
        s = suggest_lr(shape, steps=cfg.train.steps)
        # a scalars adapter (rl_lora/learner/tinylora.py) gets its own measured LR, also where it inherits optim.lr: auto
        tiny = {i for i, spec in enumerate(specs) if spec.scalars is not None and spec.lr == "auto"}
        adapters = [dataclasses.replace(a, lr=SCALARS_LR if i in tiny else s.lora_lr) if i in auto or i in tiny
                    else a for i, a in enumerate(cfg.adapters)]
        lr = (SCALARS_LR if not cfg.adapters and tiny else s.lora_lr) if cfg.optim.lr == "auto" else cfg.optim.lr
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr), adapters=adapters)
        if len(tiny) < max(len(specs), 1):  # (full fine-tuning has no adapter specs)
            notes.append(f"lr: auto -> {s.lora_lr:.3g} ({s.how})")
            notes += [f"lr: measured here, {line}" for line in measured_lrs(shape)]
        if tiny:
            notes.append(f"lr: auto -> {SCALARS_LR:g} for scalars adapters (measured, README \"Sub-rank-1 adapters\")")
    episodes = cfg.train.steps * cfg.train.prompts_per_step * cfg.sampler.samples_per_prompt
    if is_full_finetune(cfg):
        notes.append("lora.rank: full -- full fine-tuning of every weight (the baseline); the engine's weights are "
                     "overwritten in place after every step")
    for spec in adapter_specs(cfg):  # a LoRA-sized LR barely moves a scalars adapter (benchmarks/scalars_lr.py)
        if spec.scalars is not None and spec.lr < SCALARS_LR / 5:
            notes.append(f"lr {spec.lr:g} for the scalars adapter {spec.name!r} is far below the {SCALARS_LR:g} "
                         "suggested for scalars (README \"Sub-rank-1 adapters\"; optim.lr: auto uses it)")
    seen = set()
    for spec in adapter_specs(cfg):
        key = (spec.rank, tuple(spec.target_modules), spec.expert_rank, repr(spec.scalars))
        if key not in seen:
            seen.add(key)
            line = capacity_check(shape, spec.rank, spec.target_modules, episodes, spec.expert_rank,
                                  spec.scalars).message()
            notes.append(line if len(cfg.adapters) < 2 else f"{line} [{spec.name}]")
    return cfg, notes


def final_table(session, k_: list[int], task, out_dir: Path) -> dict:
    """Base model and the trained models of `task` (adapter indices `k_`) side by side on its held-out set,
    written to `out_dir`. The policy says how (adapters: one multi-LoRA generate call; full fine-tuning: the
    trained weights, then the original ones reloaded, with the same request seeds)."""
    from rl_lora.eval.reports import format_table, write_results
    from rl_lora.eval.runner import LIVE_EVAL_SEED, evaluate_models
    from rl_lora.evaldata import EvalSet

    cfg, run, policy, data = session.cfg, session.run, session.policy, task.data
    k, temperature = (cfg.train.eval_samples, cfg.sampler.temperature) if cfg.train.eval_samples else (1, 0.0)
    evalset = EvalSet("held-out", task.held_out, f"{data.source} (held-out, disjoint from training)")
    labels = [f"{policy.names[j]}@{cfg.train.steps}" for j in k_]
    dirs = [session.run_dir / policy.weight_dirs[j] for j in k_]
    t0 = time.perf_counter()

    def evaluate(models):
        return evaluate_models(run.fleet, models, [evalset], data, session.eval_scorer, k=k, temperature=temperature,
                               max_tokens=cfg.sampler.max_tokens, top_p=cfg.sampler.top_p, seed=LIVE_EVAL_SEED,
                               stop=cfg.sampler.stop)

    rows, sample_rows = policy.final_rows(run.fleet, session.model_path, labels, [run.refs[j] for j in k_],
                                          evaluate, k)
    payload = {"config": {"model": cfg.model.path, "k": k, "temperature": temperature, "top_p": cfg.sampler.top_p,
                          "max_tokens": cfg.sampler.max_tokens, "seed": LIVE_EVAL_SEED,
                          "adapters": {label: str(d) for label, d in zip(labels, dirs)}},
               "data": {evalset.name: evalset.origin},
               "prompt_format": {"system_prompt": data.system_prompt, "instruction": data.instruction},
               "results": rows, "decontamination": {}, "time_s": round(time.perf_counter() - t0, 1)}
    write_results(out_dir, payload, sample_rows)
    return {"rows": rows, "table": format_table(rows), "dir": str(out_dir)}


def evaluate_all(run, tasks: list, K: int, scorer, cfg: Config) -> list[dict]:
    """Held-out metrics of every live adapter on its dataset's held-out set (avg@k with its 95% interval, pass@j,
    maj@k) through the running sampler, one generate call per dataset, with fixed request seeds so that
    evaluations along a run are paired. One dict of `eval/...` per adapter ({} where its dataset has none)."""
    from rl_lora.eval.runner import eval_live

    out_K = [{} for _ in range(K)]
    for t, k_ in by_dataset(tasks):
        if t.held_out:
            outs = eval_live(run.fleet, [run.refs[k] for k in k_], t.eval_prompts, t.held_out, scorer,
                             k=cfg.train.eval_samples, temperature=cfg.sampler.temperature,
                             max_tokens=cfg.sampler.max_tokens, top_p=cfg.sampler.top_p, stop=cfg.sampler.stop)
            for k, res in zip(k_, outs):
                out_K[k] = res
    return out_K


def make_policy(cfg: Config, model_path: str) -> Adapters | FullModel:
    """The learner and what it trains, chosen once from `lora.rank`: the run's adapters on the frozen base, or
    (`full`) the model's own weights."""
    kwargs = dict(betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay,
                  grad_clip=cfg.optim.grad_clip, dtype=cfg.model.dtype,
                  tokens_per_microbatch=cfg.optim.tokens_per_microbatch, temperature=cfg.sampler.temperature,
                  top_k=cfg.sampler.top_k, top_p=cfg.sampler.top_p,
                  activation_checkpointing=cfg.optim.activation_checkpointing,
                  share_prompts=cfg.optim.share_prompts, loss=build_loss(cfg.loss))
    if is_full_finetune(cfg):
        return FullModel(Learner.full_model(model_path, lr=cfg.optim.lr, **kwargs))
    return Adapters(Learner(model_path, adapter_specs(cfg), **kwargs))


def follow(cfg: Config, resume: bool) -> dict:
    """A learner rank > 0 under torchrun: the same learner (and checkpoint) as rank 0, learning its shards."""
    from rl_lora.learner import distributed

    distributed.barrier()  # rank 0 has checked the config and resolved (converted) the model
    model_path = resolve_model_path(cfg.model.path)
    cfg, _ = apply_science(cfg, model_path)
    policy = make_policy(cfg, model_path)
    start = checkpoint.latest(Path(cfg.train.output_dir)) if resume else None
    if start:
        checkpoint.load(start, policy)
    distributed.broadcast_parameters(policy.learner.params)
    return {"follower_steps": distributed.follow(policy.learner)}


@dataclasses.dataclass
class Task:
    """A prompt stream of the run: a dataset and a sample seed, with the adapters that train on it (one Task unless
    adapters bring their own data or sample seed). Streams of one dataset share its problems and held-out set."""

    name: str
    data: object  # DataConfig
    adapters: list[int]
    train: list
    held_out: list
    train_prompts: list = None
    eval_prompts: list = None
    stream: PromptStream = None
    prefix: str = ""  # "<name>/" before its dataset's metrics and table, "" when it is the run's only dataset
    eval_dir: str = "eval"  # where its dataset's final table goes in the run folder
    seed: int = 0  # the sample seed: training-prompt order (with `dataset`) and request seeds
    dataset: int = 0  # index of its dataset among the run's datasets (the run's own first)


def load_tasks(cfg: Config, specs: list) -> tuple[list[Task], list[int]]:
    """The run's prompt streams, one per (dataset, sample seed) of its adapters (the run's own first), and each
    adapter's index among them; data errors surface here, before any model loads."""
    tasks, keys, datasets, task_of = [], [], {}, []
    for k, spec in enumerate(specs):
        data_key = json.dumps(dataclasses.asdict(spec.data), sort_keys=True)
        if data_key not in datasets:
            name = "data" if spec.data == cfg.data else f"{spec.name}-data"
            datasets[data_key] = (len(datasets), name, load_problems(spec.data))
        if (data_key, spec.sample_seed) not in keys:
            keys.append((data_key, spec.sample_seed))
            d, name, (train, held_out) = datasets[data_key]
            tasks.append(Task(name, spec.data, [], train, held_out, seed=spec.sample_seed, dataset=d))
        task_of.append(keys.index((data_key, spec.sample_seed)))
        tasks[task_of[-1]].adapters.append(k)
    if len(datasets) > 1:
        for t in tasks:
            t.prefix, t.eval_dir = f"{t.name}/", f"eval/{t.name}"
    return tasks, task_of


def by_dataset(tasks: list[Task]) -> list[tuple[Task, list[int]]]:
    """Each dataset of the run once (its first stream), with every adapter that trains on it, in adapter order:
    evaluations are per dataset (one held-out set, one table, one base row), training is per stream."""
    first = {}
    for t in tasks:
        first.setdefault(t.dataset, (t, []))[1].extend(t.adapters)
    return [(t, sorted(k_)) for t, k_ in first.values()]


class Session:
    """Setup and teardown of a run on rank 0, in one place: every check that needs no model (in __init__), then
    the resources (reward runners, sampler fleet, learner and its policy, the data-parallel leader, the logger)
    and the resume point (in __enter__); __exit__ closes what was opened. The loop (`train`) calls its stages."""

    def __init__(self, cfg: Config, resume: bool, quiet: bool, overwrite: bool):
        self.quiet = quiet
        self.run_dir = run_dir = preflight(cfg, resume, overwrite)
        self.specs = run_specs(cfg)  # the K adapters, or the full model
        self.K = len(self.specs)
        self.names_K = [s.name for s in self.specs]
        self.tasks, self.task_of = load_tasks(cfg, self.specs)  # data errors before any model loads
        self.model_path = model_path = resolve_model_path(cfg.model.path)
        check_model(cfg, model_path)  # output layer, target_modules, sampler settings: before any model loads
        for t, _ in by_dataset(self.tasks):  # once per dataset; its streams share the token ids
            prompts = tokenize_prompts(cfg, model_path, t.train, t.held_out, t.data)
            for same in self.tasks:
                if same.dataset == t.dataset:
                    same.train_prompts, same.eval_prompts = prompts
        cfg, notes = apply_science(cfg, model_path)
        self.cfg = cfg
        if torch.cuda.is_available():  # the GPU memory plan (`rl-lora plan`): refuse what cannot fit, before any model
            notes.append(check_fits(cfg, model_path).summary())
        for line in notes:
            print(line) if not quiet or "WARNING" in line else None
        self.start = checkpoint.latest(run_dir) if resume else None
        if resume and self.start is None:
            print(f"--resume: no complete checkpoint in {run_dir}/checkpoints, starting from step 0")
        for line in rundir.check_resume(cfg, self.start, len(self.tasks)) if self.start else []:
            print(line)
        moved = rundir.move_aside(run_dir) if overwrite else None  # every check without a model has passed
        if moved:
            print(f"--overwrite: the earlier run's files in {run_dir} were moved to {moved}")
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        self.problems_K = [self.tasks[d].train for d in self.task_of]
        self.runners, self.fleet, self.leader, self.run = {}, None, None, None

    def say(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text)

    def __enter__(self) -> "Session":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        from reward import RewardRunner
        from rl_lora.learner import distributed

        cfg, tasks = self.cfg, self.tasks
        if distributed.world()[1] > 1:
            distributed.barrier()
        for spec in self.specs:  # one runner per distinct reward list; adapters with the same list share it
            key = json.dumps(spec.rewards, sort_keys=True)
            if key not in self.runners:
                self.runners[key] = RewardRunner(spec.rewards, timeout_s=cfg.reward.timeout_s,
                                                 num_workers=cfg.reward.num_workers)
        self.scorers_K = [self.runners[json.dumps(spec.rewards, sort_keys=True)] for spec in self.specs]
        self.runners["eval"] = self.eval_scorer = RewardRunner(
            [{"name": "math_answer"}], timeout_s=cfg.reward.timeout_s, num_workers=min(cfg.reward.num_workers, 1))
        self.fleet = build_fleet(cfg, self.model_path, say=self.say)
        self.policy = make_policy(cfg, self.model_path)  # adapters or the full model: chosen once, here
        self.learner = learner = self.policy.learner
        check_disk(self.run_dir, learner)
        fresh = {"step": 0, "data_position": [0] * len(tasks), "version": 0, "run_id": checkpoint.new_run_id()}
        state = checkpoint.load(self.start, self.policy) if self.start else fresh
        self.ckpt_state = {"run_id": state.get("run_id", ""), "signature": rundir.run_signature(cfg)}
        self.learn_step = learner.train_step
        if distributed.world()[1] > 1:  # torchrun: rank 0 shares every step out to the other learner ranks
            distributed.broadcast_parameters(learner.params)
            self.leader = distributed.Leader(learner)
            self.learn_step = self.leader.train_step
        self.first_step = state["step"]
        for t, position in zip(tasks, loaded_position(state["data_position"])):
            t.stream = PromptStream(len(t.train), t.seed + t.dataset, position)
        self.logger = MetricsLogger(self.run_dir, cfg.train.wandb_project, to_dict(cfg),
                                    resume_step=self.first_step if self.start else None)
        probe_ids = (tasks[0].eval_prompts or tasks[0].train_prompts)[0]
        self.run = Run(cfg, self.fleet, learner, self.policy, probe_ids)
        self.run.version = state["version"]
        self.run.push(self.first_step)
        self.summary = {"trainable_parameters": learner.num_trainable(), "adapters": self.names_K}
        if self.start is None and cfg.train.eval_every and any(t.held_out for t in tasks):  # step 0 of the curve
            before = with_names({}, self.evaluate(), self.names_K)
            self.logger.log(0, before)
            self.summary["eval_before"] = before

    def close(self) -> None:
        if self.leader is not None:
            self.leader.stop()
        for runner in self.runners.values():
            runner.close()
        if self.fleet is not None:
            self.fleet.close()

    # -- the loop's stages -----------------------------------------------------------------------------------

    def steps(self):
        self.bar = tqdm(range(self.first_step + 1, self.cfg.train.steps + 1), initial=self.first_step,
                        total=self.cfg.train.steps, desc="train", disable=self.quiet, dynamic_ncols=True)
        return self.bar

    def sample(self, step: int):
        """The step's groups, G completions per prompt under the live adapters; async: the requests of the next
        `max_staleness` steps are submitted now, under the version live now."""
        cfg, tasks = self.cfg, self.tasks
        for ahead in range(step, min(step + cfg.train.max_staleness, cfg.train.steps) + 1):
            if ahead not in self.run.in_flight:
                idx_D = [t.stream.next(cfg.train.prompts_per_step) for t in tasks]
                self.run.submit(ahead, idx_D, [[tasks[d].train_prompts[i] for i in idx_D[d]] for d in self.task_of],
                                [t.stream.position for t in tasks], [tasks[d].seed for d in self.task_of])
        sub, completions = self.run.collect(step)
        return sub, assemble_groups(completions, sub.idx_D, tasks, self.task_of)

    def learn(self, samples: list, step: int) -> tuple[dict, list[dict]]:
        """One AdamW step of every adapter on its samples (sharded over the learner ranks under torchrun)."""
        if not samples:
            return {}, [{} for _ in range(self.K)]
        if faults.fire("nan_logprobs", step):
            samples[0].sampler_logprobs = [float("nan")] * len(samples[0].sampler_logprobs)
        return self.learn_step(samples)

    def evaluate(self) -> list[dict]:
        return evaluate_all(self.run, self.tasks, self.K, self.eval_scorer, self.cfg)

    def log(self, step: int, total: dict, per_K: list[dict], groups: list, scored) -> None:
        m = with_names(total, per_K, self.names_K)
        self.logger.log(step, m)
        G = len(groups[0].completions)
        self.logger.log_samples(step, [(g.prompt, c.text, r) for j, g in enumerate(groups[:2])
                                       for c, r in zip(g.completions[:2], scored.rewards[j * G:j * G + 2])])
        self.bar.write(format_step(step, m)) if not self.quiet else None

    def save(self, step: int, sub) -> None:
        checkpoint.save(self.run_dir, step, self.policy, {"data_position": saved_position(sub.data_position),
                                                          "version": self.run.version, **self.ckpt_state})

    def finish(self) -> dict:
        """The trained weights on disk (fsynced before "done"), the final tables, the summary."""
        self.bar.close()
        run_dir, policy = self.run_dir, self.policy
        policy.write(run_dir)
        for top in dict.fromkeys(d.split("/")[0] for d in policy.weight_dirs):  # adapter/, adapters/ or model/
            atomic.fsync_tree(run_dir / top)
        atomic.fsync_path(run_dir)
        base_D, trained_K, tables, rows = [], [{} for _ in range(self.K)], [], []
        for t, k_ in by_dataset(self.tasks):
            if not t.held_out:
                continue
            final = final_table(self, k_, t, run_dir / t.eval_dir)
            base_D.append({f"{t.prefix}eval/base_accuracy": final["rows"][0]["avg_at_k"]})
            for k, trained in zip(k_, final["rows"][1:]):
                trained_K[k] = {"eval/accuracy": trained["avg_at_k"],
                                "eval/accuracy_ci95_lo": trained["avg_at_k_ci95"][0],
                                "eval/accuracy_ci95_hi": trained["avg_at_k_ci95"][1]}
                if trained["accuracy_given_answer"] is not None:
                    trained_K[k]["eval/accuracy_given_answer"] = trained["accuracy_given_answer"]
            tables.append(f"[{t.name}: {t.data.source}]\n{final['table']}" if t.prefix else final["table"])
            rows += final["rows"]
        if tables:
            self.logger.log(self.cfg.train.steps, with_names({k: v for m in base_D for k, v in m.items()},
                                                             trained_K, self.names_K))
            self.summary.update(eval_table="\n\n".join(tables), eval_rows=rows, eval_dir=str(run_dir / "eval"))
        self.logger.close()
        self.summary["plot"] = str(plot_rewards(run_dir))
        self.summary["run_dir"] = str(run_dir)
        return self.summary


def train(cfg: Config, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict:
    from rl_lora.learner import distributed

    if distributed.init()[0] > 0:
        return follow(cfg, resume)
    with Session(cfg, resume, quiet, overwrite) as s:
        cfg, run = s.cfg, s.run
        failed_rewards, skipped = Streak(cfg.reward.max_failed_steps), Streak(cfg.train.max_skipped_steps)
        for step in s.steps():
            t0 = time.perf_counter()
            # 1. sample G completions per prompt under the live adapters (async: submitted up to max_staleness
            #    steps ahead, under the version live then)
            sub, groups = s.sample(step)
            lag = staleness(run.version, groups, s.policy.version_of, sub.version)
            check_staleness(lag, cfg.train.max_staleness, step)
            t1 = time.perf_counter()
            # 2. score every completion (wall-clock limited; a failed or timed-out call leaves it unscored)
            scored = score_completions(s.scorers_K, groups, s.problems_K)
            check_scored(scored, failed_rewards, step)
            t2 = time.perf_counter()
            # 3. group-centred advantages over the scored completions; zero-variance groups carry no signal
            kept, dropped_for_failure = assign_advantages(groups, scored, cfg.loss.scale_by_std)
            # 4. learn: one AdamW step over all kept completions
            learned, learned_K = s.learn(make_samples(kept), step)
            t3 = time.perf_counter()
            # 5. push the new version into the running fleet (new id, old one evicted), and check it
            push = run.push(step) if check_learned(learned, skipped, step, s.say) else None
            t4 = time.perf_counter()
            # 6. log, evaluate, checkpoint
            total, per_K = step_metrics(groups, scored, kept, dropped_for_failure, s.K)
            total.update({"adapter/version": float(run.version), "sampler/restarts": float(run.fleet.restarts),
                          "async/staleness": float(lag), "time/sample": t1 - t0, "time/score": t2 - t1,
                          "time/learn": t3 - t2, "time/step": t4 - t0, **learned,
                          **(push.metrics() if push else {"time/push": t4 - t3, "time/push_check": 0.0,
                                                          "time/push_wait": 0.0})})
            per_K = [{**m, **learn_k} for m, learn_k in zip(per_K, learned_K)]
            if is_due(step, cfg.train.eval_every) and step < cfg.train.steps:
                per_K = [{**m, **eval_k} for m, eval_k in zip(per_K, s.evaluate())]
            s.log(step, total, per_K, groups, scored)
            if is_due(step, cfg.train.save_every) or step == cfg.train.steps:
                s.save(step, sub)
        return s.finish()
