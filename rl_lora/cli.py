"""`rl-lora` command line. Heavy modules are imported lazily so `--help` and config errors are instant."""

from __future__ import annotations

import argparse
import os
import sys


def _train(args) -> int:
    from rl_lora.config import is_full_finetune, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from rl_lora.config import describe

        print(describe(cfg))
        return 0
    from rl_lora.train import train

    summary = train(cfg, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    if "follower_steps" in summary:  # a learner rank > 0 under torchrun: rank 0 reports
        return 0
    if summary.get("eval_table"):
        k = cfg.train.eval_samples
        how = f"avg@{k} at temperature {cfg.sampler.temperature}" if k else "greedy"
        what = ("fine-tuned model" if is_full_finetune(cfg) else "trained adapters" if cfg.adapters
                else "trained adapter")
        print(f"\nheld-out accuracy, base model vs {what} ({cfg.data.eval_size} problems, {how}, "
              "same engine, paired seeds):")
        print(summary["eval_table"])
        print(f"eval results: {summary['eval_dir']}/ (eval_results.json/.md, pass_at_k.png, eval_samples.jsonl)")
    print(run_dir_line(cfg, summary["run_dir"]))
    return 0


def run_dir_line(cfg, run_dir) -> str:
    """Where the trained weights are: model/ (full fine-tuning), adapters/<name>/ (several adapters) or adapter/."""
    from rl_lora.config import is_full_finetune

    weights = "model/" if is_full_finetune(cfg) else "adapters/<name>/" if cfg.adapters else "adapter/"
    return f"run dir: {run_dir}  ({weights}, metrics.jsonl, reward_curve.png, checkpoints/)"


def _sweep(args) -> int:
    from rl_lora.sweep import parse_lrs, summarise, sweep_config

    cfg = sweep_config(args.config, parse_lrs(args.lr), args.overrides)
    from rl_lora.train import train

    summary = train(cfg, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    if "follower_steps" in summary:  # a learner rank > 0 under torchrun: rank 0 reports
        return 0
    result = summarise(cfg, summary)
    print(f"\nsweep of {len(cfg.adapters)} learning rates as {len(cfg.adapters)} adapters of one run "
          f"({cfg.train.steps} steps; held-out: {cfg.data.eval_size} problems, paired seeds):")
    print(result["table"])
    print(f"run dir: {summary['run_dir']}  (sweep.md, sweep.json, reward_curve.png, adapters/<name>/, eval/)")
    return 0


def _grid(args) -> int:
    from rl_lora import grid

    g = grid.expand(args.config, args.overrides)  # every run's config checked: nothing has loaded or been written
    print(grid.describe(g))
    if args.list:
        return 0
    times = None if args.summary_only else grid.run_all(g, resume=args.resume, overwrite=args.overwrite,
                                                        quiet=args.quiet)
    result = grid.summarise(g, times)
    print(f"\n{result['table']}")
    print(f"grid dir: {g.dir}  (grid.md, grid.json, grid.png; {', '.join(g.runs)})")
    return 0


def _eval(args) -> int:
    from rl_lora.eval.command import main

    return main(args)


def _lr_suggest(args) -> int:
    from rl_lora.config import ALL_LINEAR, ConfigError
    from rl_lora.models import resolve_model_path
    from rl_lora.science import capacity_check, read_shape, suggest_lr

    if args.fullft_lr is not None and not args.fullft_lr > 0:
        raise ConfigError(f"--fullft-lr: must be > 0, got {args.fullft_lr}")
    if args.rank < 1 or (args.steps is not None and args.steps < 1) or args.episodes_per_step < 1:
        raise ConfigError("--rank, --steps and --episodes-per-step must be >= 1")
    if args.scalars is not None and args.scalars < 1:
        raise ConfigError(f"--scalars: must be >= 1, got {args.scalars}")
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else ALL_LINEAR
    try:
        shape = read_shape(resolve_model_path(args.model))
    except ConfigError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"--model {args.model}: cannot read its config.json ({str(exc).splitlines()[0]})") from None
    s = suggest_lr(shape, fullft_lr=args.fullft_lr, steps=args.steps)
    print(f"model         {args.model} ({shape.model_type}, hidden {shape.hidden_size}, {shape.num_layers} layers)")
    print(f"full-FT LR    {s.fullft_lr:.3g}" + ("" if args.fullft_lr is not None else " (fitted rule)"))
    print(f"LoRA LR       {s.lora_lr:.3g}  = {s.multiplier:.3g} x full FT; {s.how}")
    print("              (same for any rank: alpha/r makes the optimum rank-independent; LoRA+ would use "
          "lr_B = 16 x lr_A)")
    if args.scalars is not None:
        from rl_lora.config import ScalarsConfig
        from rl_lora.science import SCALARS_LR, scalar_parameters

        n = scalar_parameters(shape, args.scalars, args.share, targets)
        print(f"scalars LR    {SCALARS_LR:g}  (lora.trainable: scalars; measured, README \"Sub-rank-1 adapters\"; "
              f"{n:,} trainable scalars: {args.scalars} per {'module' if args.share == 'none' else args.share})")
        if args.steps is not None:
            cap = capacity_check(shape, args.rank, targets, args.steps * args.episodes_per_step,
                                 scalars=ScalarsConfig(count=args.scalars, share=args.share))
            print(cap.message().replace("capacity: ", "capacity      "))
    elif args.steps is not None:
        cap = capacity_check(shape, args.rank, targets, args.steps * args.episodes_per_step)
        print(cap.message().replace("capacity: ", "capacity      "))
    else:
        from rl_lora.science import adapter_parameters

        print(f"adapter       {adapter_parameters(shape, args.rank, targets):,} parameters at rank {args.rank} "
              f"on {', '.join(targets)}")
    from rl_lora.science import measured_lrs

    measured = measured_lrs(shape)
    for i, line in enumerate(measured or ["no committed grid for this model family yet (experiments/*/results.json, "
                                          "written by `rl-lora grid`)"]):
        print(f"{'measured' if i == 0 else '':<14}{line}")
    if args.scalars is not None:
        from rl_lora.science import SCALARS_LR

        print(f"config        lora.trainable: scalars, lora.scalars: {{count: {args.scalars}, share: {args.share}}}, "
              f"optim.lr: {SCALARS_LR:g}   (or optim.lr: auto)")
    else:
        print(f"config        optim.lr: {s.lora_lr:.3g}   (or optim.lr: auto)")
    return 0


OVERWRITE_HELP = ("start a new run in a train.output_dir that holds an earlier run: once the config has passed every "
                  "check, the earlier run's files are moved to <output_dir>.old-<UTC time> beside it (nothing is "
                  "deleted). Without it such a folder is refused")


def _plan(args) -> int:
    from rl_lora.config import ConfigError, load_config
    from rl_lora.models import resolve_model_path
    from rl_lora.plan import make_plan

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, resolve_model_path(cfg.model.path))
    print(f"GPU memory plan: {cfg.model.path} ({plan.source}), {cfg.model.dtype}, "
          f"{'engine beside the learner' if plan.colocated else 'engines on their own GPUs'}")
    print(plan.table())
    for line in plan.problems[1:]:
        print(f"also: {line}")
    if plan.problems:
        raise ConfigError(plan.problems[0])
    print(f"fits: learner {plan.learner_gib:.1f} GiB"
          + (f" + engine {plan.engine_gib:.1f} GiB" if plan.colocated else "") + f" <= {plan.available_gib:.1f} GiB")
    return 0


def config_sections_help() -> str:
    """The config's sections with their docs (read from the dataclasses), for `rl-lora train --help`."""
    import dataclasses

    from rl_lora.config import Config

    rows = [f"  {f.name:<9} {f.metadata['doc']}" for f in dataclasses.fields(Config)]
    return "config sections:\n" + "\n".join(rows) + ("\n\nevery key with its value and one-line doc: "
                                                    "rl-lora train CONFIG --print-config")


def build_parser() -> argparse.ArgumentParser:
    from rl_lora.eval.command import add_arguments as add_eval_arguments

    parser = argparse.ArgumentParser(prog="rl-lora", description="GRPO-style RL for rank-1 LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run the sample -> score -> learn -> push loop",
                       description="Train a LoRA adapter with RL. Overrides: section.key=value, e.g. optim.lr=3e-4.",
                       epilog=config_sections_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=1 train.steps=50")
    t.add_argument("--resume", action="store_true", help="continue from the run dir's latest complete checkpoint "
                   "(a changed model or adapter shape is refused; changed optimizer settings apply from the next step)")
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config, every key with its one-line doc, and exit (loads no model)")
    t.set_defaults(func=_train)
    w = sub.add_parser("sweep", help="train K learning rates at once: K adapters on one base, one run",
                       description="Learning-rate sweep as K adapters of one run (one sampler, one learner, shared "
                                   "batches, one optimizer per adapter). Prints and writes a summary table; the best "
                                   "adapter by held-out score is marked.")
    w.add_argument("config", help="YAML run config (see configs/); lora.* applies to every adapter")
    w.add_argument("--lr", required=True, help="comma-separated learning rates, e.g. 1e-4,3e-4,1e-3,3e-3")
    w.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    w.add_argument("--resume", action="store_true", help="continue from the run dir's latest complete checkpoint")
    w.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    w.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")
    w.set_defaults(func=_sweep)
    g = sub.add_parser("grid", help="learning rates x seeds x variants as adapters of one run (+ full fine-tuning "
                                    "runs), summarised with intervals over seeds",
                       description="A grid config is a run config with a grid: section (lrs, seeds, variants). Every "
                                   "LoRA cell is an adapter of one run; full fine-tuning cells (a variant with rank: "
                                   "full) are runs of their own. Cells of a seed share prompts and request seeds. "
                                   "Writes grid.md, grid.json and grid.png (held-out accuracy vs LR, 95%% t-interval "
                                   "over seeds) into train.output_dir.")
    g.add_argument("config", help="YAML grid config (see experiments/)")
    g.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=8 grid.seeds=[0,1]")
    g.add_argument("--list", action="store_true", help="print the runs and cells, and exit (loads no model)")
    g.add_argument("--summary-only", action="store_true", help="train nothing: summarise the runs already there")
    g.add_argument("--resume", action="store_true", help="continue every run from its latest complete checkpoint")
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")
    g.set_defaults(func=_grid)
    e = sub.add_parser("eval", help="evaluate the base model and adapters: avg@k, pass@k, maj@k with 95%% intervals",
                       description="Evaluate the base model and every --adapter in one vLLM engine (multi-LoRA), "
                                   "k samples per problem. Writes eval_results.json/.md, pass_at_k.png and "
                                   "eval_samples.jsonl to --out (default: <first adapter's parent>/eval).")
    add_eval_arguments(e)
    e.set_defaults(func=_eval)
    s = sub.add_parser("lr-suggest", help="the paper's LoRA learning rate for a model, and a capacity check",
                       description="LoRA LR from LoRA Without Regret: 10x a known full-FT LR (15x under 100 steps), "
                                   "or the fitted rule 9.8 x 5e-5 x (2000/hidden)^p (p: Llama 0.781, Qwen 0.0775). "
                                   "Reads only the model's config.json.")
    s.add_argument("--model", required=True, help="HF name, local HF dir, or smollm2-135m-gguf")
    s.add_argument("--fullft-lr", type=float, help="a known-good full fine-tuning LR for this model and task")
    s.add_argument("--steps", type=int, help="planned optimizer steps (short runs want a larger multiplier)")
    s.add_argument("--episodes-per-step", type=int, default=256,
                   help="completions per step, for the capacity check (default 256)")
    s.add_argument("--rank", type=int, default=1, help="LoRA rank for the capacity check (default 1)")
    s.add_argument("--target-modules", help="comma-separated; default: all linear layers")
    s.add_argument("--scalars", type=int, metavar="COUNT",
                   help="a sub-rank-1 adapter (lora.trainable: scalars) with COUNT scalars per share group: its LR "
                        "and capacity instead of LoRA's")
    s.add_argument("--share", choices=["none", "layer", "model"], default="none",
                   help="with --scalars: which modules share one set of scalars (default none)")
    s.set_defaults(func=_lr_suggest)
    p = sub.add_parser("plan", help="predict a run's GPU memory (learner + engine) from config.json; refuse if it "
                                    "cannot fit",
                       description="GPU memory plan from the model's config.json alone (no weights): learner weights, "
                                   "adapters + optimizer, activations x micro-batch tokens, logits chunk, the engine's "
                                   "share. Exit 2 with one line if it cannot fit model.gpu_memory_gib.")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.tokens_per_microbatch=8192")
    p.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a `nargs="*"` positional at the first flag, so `train CFG --resume train.steps=8` would leave
    # the override unrecognised: overrides may come after the flags too
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from rl_lora.errors import ConfigError, RunError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rl-lora: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"rl-lora: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rl-lora: interrupted (the latest complete checkpoint is kept; use --resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rl-lora grid CFG --list | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor one from the final flush
        return 141


if __name__ == "__main__":
    sys.exit(main())
