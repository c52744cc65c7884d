"""Train on the Ray cluster this job is submitted to: `rl-lora train` that joins the cluster.

    ray job submit --working-dir . --entrypoint-num-gpus=1 -- \\
        python launch/ray_train.py configs/qwen3_8b_deepmath.yaml sampler.num_engines=7 train.max_staleness=1

The learner runs in this process (one GPU, reserved from Ray by --entrypoint-num-gpus so that no engine lands on
it); the engines are Ray actors on the cluster's other GPUs. `sampler.ray_address=auto` is added right after the
config, so an explicit override later on the line still wins. See docs/cluster.md.
"""

import sys
from pathlib import Path

# `python launch/ray_train.py` puts launch/ on the path, not the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rl_lora.cli import main


def train_argv(args: list[str]) -> list[str]:
    """`rl-lora train` arguments: ours right after the config, flags (none takes a value) after every override,
    because argparse takes no positional after an optional."""
    positional = [a for a in args if not a.startswith("-")]
    flags = [a for a in args if a.startswith("-")]
    if not positional:  # no config: let `rl-lora train` print its usage or help
        return ["train", *flags]
    return ["train", positional[0], "sampler.ray_address=auto", *positional[1:], *flags]


if __name__ == "__main__":
    sys.exit(main(train_argv(sys.argv[1:])))
