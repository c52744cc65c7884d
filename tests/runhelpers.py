"""Helpers for tests that drive `rl-lora train` end to end: a tiny-model run config and a CLI runner."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def write_config(tmp_path: Path, tiny_model: str, **sections) -> Path:
    """A small run of the tiny model on the arithmetic prompts with a first-character reward; `sections`
    update the defaults section by section."""
    cfg = {
        "model": {"path": tiny_model, "max_model_len": 256},
        "data": {"source": "arithmetic", "max_operand": 20, "train_size": 100, "eval_size": 2},
        "sampler": {"samples_per_prompt": 4, "temperature": 1.0, "max_tokens": 4},
        "train": {"steps": 3, "prompts_per_step": 2, "output_dir": str(tmp_path / "run"), "save_every": 1,
                  "eval_samples": 1, "wandb_project": ""},
        "optim": {"lr": 5e-3},
        "reward": {"rewards": [{"name": "reward_fixtures:ascii_start"}], "num_workers": 1},
    }
    for section, values in sections.items():
        if isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:  # a top-level list such as adapters
            cfg[section] = values
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args, faults: str = "", timeout: int = 300, env: dict | None = None):
    env = {"PYTHONPATH": f"{TESTS}:{ROOT}", "WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin", **(env or {})}
    if faults:
        env["RL_LORA_FAULTS"] = faults
    return subprocess.run([sys.executable, "-m", "rl_lora.cli", "train", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=env)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_rows(run: Path) -> list[dict]:
    return [r for r in metrics(run) if "reward/mean" in r]


def wait_for_server(proc, port: int, log, timeout_s: float = 600) -> None:
    """Wait until a vLLM OpenAI server started as `proc` on 127.0.0.1:`port` answers /health; fail the test (with
    the end of its `log`) if it exits first or is not ready within `timeout_s`."""
    import time
    import urllib.error
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the server exited with {proc.returncode}: {log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the server was not ready within {timeout_s} s")
