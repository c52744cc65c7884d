"""`rl-lora` command line. Heavy modules are imported lazily so `--help` and config errors are instant."""

from __future__ import annotations

import argparse
import json
import sys


def _train(args) -> int:
    from rl_lora.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from rl_lora.config import dump_yaml

        print(dump_yaml(cfg))
        return 0
    from rl_lora.train import train

    summary = train(cfg, resume=args.resume, quiet=args.quiet)
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    print("\nheld-out accuracy (greedy, %d problems)" % cfg.data.eval_size)
    print(f"  {'':8s} {'accuracy':>9s} {'mean len':>9s} {'truncated':>9s}")
    for name, row in (("before", before), ("after", after)):
        if row:
            print(f"  {name:8s} {row['eval/accuracy']:9.3f} {row['eval/length_mean']:9.1f} {row['eval/truncated']:9.3f}")
    print(f"run dir: {summary['run_dir']}  (adapter/, metrics.jsonl, reward_curve.png, checkpoints/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl-lora", description="GRPO-style RL for rank-1 LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run the sample -> score -> learn -> push loop",
                       description="Train a LoRA adapter with RL. Overrides: section.key=value, e.g. optim.lr=3e-4.")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=1 train.steps=50")
    t.add_argument("--resume", action="store_true", help="continue from the run dir's latest complete checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rl_lora.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rl-lora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rl-lora: interrupted (the latest complete checkpoint is kept; use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
