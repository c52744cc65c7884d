"""`rl-lora eval`: flags -> EvalConfig -> one engine evaluates the base model and every adapter -> result files.

EvalConfig is built from the run config's own sections (ModelConfig, SamplerConfig, RewardConfig, DataConfig),
with the eval's defaults written once here; the flags, their defaults and their key in the config come from
`FLAGS` and the dataclasses, so no default is written twice. `run_eval` builds the engine, pushes every adapter
with `evict_older=False`, makes one multi-LoRA generate call (`rl_lora.eval.runner`) and writes JSON / Markdown /
PNG (`rl_lora.eval.reports`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rl_lora.config import (
    DTYPES,
    ConfigError,
    DataConfig,
    ModelConfig,
    RewardConfig,
    SamplerConfig,
    check_fields,
    section,
    setting,
)

# Adapter versions pushed by `run_eval`: a range of their own, never reused in this process. A reused version is
# a reused vLLM LoRA name, and vLLM's prefix cache (keyed by name) would serve KV computed by the old adapter.
_EVAL_VERSIONS = itertools.count(1_000_001)


@dataclass
class EvalConfig:
    """What `rl-lora eval` runs: the run config's sections with the eval's defaults, plus the eval's own keys."""

    # dtype auto: bfloat16 on GPU, float32 on CPU. max_model_len 0: the model's own limit.
    model: ModelConfig = section(ModelConfig, "the base model and the engine's dtype and context",
                                 lambda: ModelConfig(path="", dtype="auto", max_model_len=0))
    # samples_per_prompt is k. Greedy (temperature 0) is allowed here (with k = 1): no importance ratio is formed.
    # max_tokens 8192 as in the Qwen3-8B DeepMath recipe (~32-256 on CPU). Nothing else shares the GPU: 0.9.
    sampler: SamplerConfig = section(SamplerConfig, "k samples per problem and how they are sampled",
                                     lambda: SamplerConfig(samples_per_prompt=16, temperature=0.6, max_tokens=8192,
                                                           gpu_memory_utilization=0.9))
    reward: RewardConfig = section(RewardConfig, "the verifier's time limit and workers (the reward is math_answer)")
    data: DataConfig = section(DataConfig, "prompt format and arithmetic split (a run config's data section)")
    adapters: list = setting([], "PEFT adapter directories (adapter_config.json + adapter_model.safetensors); "
                             "label=path names one")
    sets: list = setting(["aime2024", "aime2025"], "eval sets: aime2024, aime2025, math500, gsm8k, arithmetic, or "
                         ".jsonl/.parquet paths")
    seed: int = setting(0, "seed of the per-request sampling seeds and of the bootstrap")
    out_dir: str = setting("", "output directory; '' = <first adapter's parent>/eval (eval-2, ... when that holds "
                           "results), or runs/eval for the base model alone")
    train_data: str = setting("", "data.source of the training data (arithmetic, a file, hf:name) to check the eval "
                              "sets against (decontamination); '' = no check")

    @property
    def k(self) -> int:
        return self.sampler.samples_per_prompt

    def check(self) -> None:
        """The eval's own rules (k >= 1, greedy needs k = 1, dtype auto), then the declared checks of the
        section fields it uses; errors name the flag."""
        s = self.sampler
        if s.samples_per_prompt < 1:
            raise ConfigError(f"--k: must be >= 1, got {s.samples_per_prompt}")
        if s.temperature < 0:
            raise ConfigError(f"--temperature: must be >= 0, got {s.temperature}")
        if s.temperature == 0 and s.samples_per_prompt > 1:
            raise ConfigError("--k: greedy decoding (--temperature 0) gives k identical samples; use --k 1")
        if self.model.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"--dtype: auto, float32, bfloat16 or float16, got {self.model.dtype!r}")
        check_fields(self.model, "model.", only=("path", "max_model_len"), key=_flag_of)
        check_fields(s, "sampler.", only=("top_p", "max_tokens", "cpu_kvcache_gib", "gpu_memory_utilization",
                                          "tensor_parallel_size"), key=_flag_of)
        check_fields(self.reward, "reward.", only=("timeout_s", "num_workers"), key=_flag_of)

    def summary(self) -> dict:
        """The flat record of eval_results.json's `config` (the keys it has always had)."""
        m, s, r = self.model, self.sampler, self.reward
        return {"model": m.path, "adapters": list(self.adapters), "data": list(self.sets), "k": self.k,
                "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": self.seed,
                "out_dir": self.out_dir, "dtype": m.dtype, "max_model_len": m.max_model_len,
                "cpu_kvcache_gib": s.cpu_kvcache_gib, "gpu_memory_utilization": s.gpu_memory_utilization,
                "tensor_parallel_size": s.tensor_parallel_size, "reward_timeout_s": r.timeout_s,
                "reward_workers": r.num_workers, "train_data": self.train_data}


# flag, EvalConfig key, argparse type, help. The default shown and used is the dataclass's.
FLAGS = [
    ("--model", "model.path", str, "base model: HF name, local HF dir, or smollm2-135m-gguf"),
    ("--adapter", "adapters", str, "PEFT adapter directory (repeatable); the base model is always evaluated too"),
    ("--data", "sets", str, "comma-separated: aime2024, aime2025, math500, gsm8k, arithmetic, or .jsonl/.parquet "
                            "files"),
    ("--k", "sampler.samples_per_prompt", int, "samples per problem"),
    ("--temperature", "sampler.temperature", float, "sampling temperature (0 = greedy, then --k 1)"),
    ("--top-p", "sampler.top_p", float, "nucleus sampling (1.0 = off)"),
    ("--max-tokens", "sampler.max_tokens", int, "completion cap in tokens (CPU: ~32-256)"),
    ("--seed", "seed", int, "sampling and bootstrap seed"),
    ("--out", "out_dir", str, "output directory (default: <first adapter's parent>/eval)"),
    ("--train-data", "train_data", str, "data.source of the training set to check the eval sets against "
                                        "(decontamination), e.g. hf:zwhe99/DeepMath-103K"),
    ("--dtype", "model.dtype", str, "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16"),
    ("--max-model-len", "model.max_model_len", int, "engine context in tokens (0 = the model's)"),
    ("--gpu-memory-utilization", "sampler.gpu_memory_utilization", float, "GPU only"),
    ("--tensor-parallel-size", "sampler.tensor_parallel_size", int, "GPU only"),
    ("--reward-workers", "reward.num_workers", int, "verifier worker processes"),
    ("--reward-timeout-s", "reward.timeout_s", float, "verifier time limit per completion, seconds"),
]
_FLAG_OF = {key: flag for flag, key, _, _ in FLAGS}


def _flag_of(key: str) -> str:
    return _FLAG_OF.get(key, key)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, dotted: str, value) -> None:
    *path, name = dotted.split(".")
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rl-lora eval` flags, defaults read from EvalConfig."""
    defaults = EvalConfig()
    for flag, key, tp, help_text in FLAGS:
        default = _get(defaults, key)
        dest = flag[2:].replace("-", "_")
        if flag == "--model":
            parser.add_argument(flag, required=True, help=help_text)
        elif flag == "--adapter":
            parser.add_argument(flag, action="append", default=list(default), metavar="[LABEL=]PATH", help=help_text)
        elif flag == "--data":
            parser.add_argument(flag, default=",".join(default), help=f"{help_text} (default {','.join(default)})")
        else:
            shown = f" (default {default})" if default != "" else ""
            parser.add_argument(flag, type=tp, default=default, dest=dest, help=help_text + shown)
    parser.add_argument("--config", help="run config whose data section (prompt format, arithmetic split) to use; "
                                         "default: the first adapter's run config.yaml, if any")
    parser.add_argument("overrides", nargs="*", help="dotted data overrides, e.g. data.max_operand=20")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args) -> EvalConfig:
    """EvalConfig from parsed flags, checked (the data section is read later: it may come from a run's config.yaml)."""
    from rl_lora.evaldata import parse_data_arg

    cfg = EvalConfig()
    for flag, key, _, _ in FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        _set(cfg, key, parse_data_arg(value) if flag == "--data" else value)
    cfg.check()
    return cfg


def main(args) -> int:
    """`rl-lora eval`: flags -> config -> run -> table on stdout."""
    from rl_lora.eval.reports import format_table

    cfg = config_from_args(args)
    cfg.data = eval_data_config(args.config, args.overrides, cfg.adapters)
    payload = run_eval(cfg, progress=not args.quiet)
    print(format_table(payload["results"]))
    print(f"results: {payload['out_dir']}/ (eval_results.json, eval_results.md, pass_at_k.png, eval_samples.jsonl)")
    return 0


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


def run_eval(cfg: EvalConfig, *, sampler=None, progress: bool = True, log=print) -> dict:
    """Evaluate the base model and every adapter on every eval set with one engine; write the results.

    `sampler`: an already running Sampler for the same base model (tests); else one is built and closed here.
    Returns the results payload (also written as eval_results.json).
    """
    from rl_lora.eval.reports import write_results
    from rl_lora.eval.runner import evaluate_models
    from rl_lora.evaldata import decontamination_report, load_eval_set

    cfg.check()
    data_cfg = cfg.data
    # Everything that can fail without a model fails first.
    adapters = parse_adapters(cfg.adapters)
    evalsets = [load_eval_set(name, data_cfg) for name in cfg.sets]
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
    scorer = RewardRunner([{"name": "math_answer"}], timeout_s=cfg.reward.timeout_s,
                          num_workers=cfg.reward.num_workers)
    pushed = []
    try:
        models: list[tuple[str, object]] = [("base", None)]
        for label, path, _ in adapters:
            version = next(v for v in _EVAL_VERSIONS if v not in sampler.live)
            ref = sampler.push(version, lambda d, src=path: shutil.copytree(src, d), evict_older=False)
            pushed.append(ref.version)
            models.append((label, ref))
        t0 = time.perf_counter()
        s = cfg.sampler
        rows, sample_rows = evaluate_models(sampler, models, evalsets, data_cfg, scorer, k=cfg.k,
                                            temperature=s.temperature, max_tokens=s.max_tokens, top_p=s.top_p,
                                            seed=cfg.seed, progress=progress, log=log, stop=s.stop)
        elapsed = time.perf_counter() - t0
    finally:
        scorer.close()
        for version in pushed:
            sampler.evict(version)
        if own_sampler:
            sampler.close()
    payload = {
        "config": {**cfg.summary(), "adapters": {label: str(path) for label, path, _ in adapters}},
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
    from rl_lora.sampling.sampler import Sampler

    m, s = cfg.model, cfg.sampler
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    return Sampler(resolve_model_path(m.path), dtype=dtype, max_model_len=m.max_model_len,
                   max_lora_rank=max((r for _, _, r in adapters), default=1), max_loras=max(len(adapters), 1),
                   kvcache_gib=s.cpu_kvcache_gib, gpu_memory_utilization=s.gpu_memory_utilization,
                   tensor_parallel_size=s.tensor_parallel_size, seed=cfg.seed)
