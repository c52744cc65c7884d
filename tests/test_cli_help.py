"""`rl-lora --help` and every subcommand's --help print and exit 0 without loading a model."""

import sys

import pytest

from rl_lora.cli import build_parser, main

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("argv", [[]] + [[c] for c in COMMANDS])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--help"])
    assert exc.value.code == 0
    assert "usage: rl-lora" in capsys.readouterr().out
    assert "vllm" not in sys.modules  # --help never imports the engine
