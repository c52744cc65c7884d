"""`rl-lora --help` and every subcommand's --help print and exit 0 without importing vLLM or a model."""

import subprocess
import sys

import pytest

from rl_lora.cli import build_parser
from rl_lora.errors import ConfigError, FleetError, RunError

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)
PROBE = ("import sys\nfrom rl_lora.cli import main\n"
         "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
         "    print('vllm imported' if 'vllm' in sys.modules else 'no vllm'); raise\n")


@pytest.mark.parametrize("argv", [[]] + [[c] for c in COMMANDS])
def test_help_exits_zero_without_importing_vllm(argv):
    out = subprocess.run([sys.executable, "-c", PROBE, *argv, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: rl-lora" in out.stdout
    assert out.stdout.strip().endswith("no vllm")


def test_overrides_after_flags_are_applied(capsys, tmp_path):
    """`rl-lora train CFG --resume train.steps=8` is how users raise the step count of a run they resume: an override
    after a flag must count, not end in argparse's "unrecognized arguments"."""
    from rl_lora.cli import main

    assert main(["train", "configs/demo_cpu.yaml", "--print-config", "train.steps=7", "sampler.max_tokens=9"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "max_tokens: 9" in out
    with pytest.raises(SystemExit):  # a real stray flag is still refused
        main(["train", "configs/demo_cpu.yaml", "--print-config", "--no-such-flag"])


def test_run_dir_line_names_the_folder_the_weights_are_in(tmp_path):
    """The last line of `rl-lora train` tells the user where the trained weights are: a run with several adapters
    writes adapters/<name>/, not adapter/."""
    from rl_lora.cli import run_dir_line
    from rl_lora.config import load_config

    one = load_config("configs/demo_cpu.yaml", [])
    two = load_config("configs/demo_cpu.yaml", ["adapters=[{name: a}, {name: b}]", "sampler.max_loras=3"])
    full = load_config("configs/demo_cpu.yaml", ["lora.rank=full"])
    assert "(adapter/," in run_dir_line(one, tmp_path)
    assert "(adapters/<name>/," in run_dir_line(two, tmp_path)
    assert "(model/," in run_dir_line(full, tmp_path)


@pytest.mark.parametrize("exc, code, line", [
    (ConfigError("train.steps: must be >= 1"), 2, "rl-lora: error: train.steps: must be >= 1"),
    (RunError("3 steps in a row had a non-finite loss"), 1, "rl-lora: stopped: 3 steps in a row had a non-finite loss"),
    (FleetError("the sampler failed 3 times on one request"), 1,
     "rl-lora: stopped: the sampler failed 3 times on one request"),
])
def test_project_errors_print_one_line_wherever_raised(monkeypatch, capsys, exc, code, line):
    """The CLI catches the project's error types by class (rl_lora/errors.py), from any command, at any depth."""
    import rl_lora.cli as cli

    def command(args):
        raise exc

    monkeypatch.setattr(cli, "_plan", command)
    assert cli.main(["plan", "any.yaml"]) == code
    assert capsys.readouterr().err == line + "\n"


def test_other_errors_are_not_swallowed(monkeypatch):
    """A bug is a traceback, not a one-line message that hides it."""
    import rl_lora.cli as cli

    def command(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_plan", command)
    with pytest.raises(KeyError):
        cli.main(["plan", "any.yaml"])
