"""Every reward kind from the config alone, through `rl-lora train`: user rewards named package.module:function
(batched, group, async) beside a per-completion one; each logs its metrics under reward/<name>/."""

import pytest
from runhelpers import ROOT, TESTS, run_cli, step_rows

pytestmark = pytest.mark.slow
# the helper rewards live in tests/unit/test_reward_kinds.py, named as a user's module would be
UNIT = {"PYTHONPATH": f"{TESTS / 'unit'}:{TESTS}:{ROOT}"}


def test_rewards_of_every_kind_from_the_config(tmp_path, make_config):
    kinds = "test_reward_kinds"
    rewards = [{"name": "reward_fixtures:ascii_start"},
               {"name": f"{kinds}:batch_len", "weight": 0.0, "batch_size": 3},
               {"name": f"{kinds}:group_rank", "weight": 0.0},
               {"name": f"{kinds}:async_flaky", "weight": 0.0, "max_concurrency": 4},
               {"name": f"{kinds}:plain_batch", "kind": "batched", "weight": 0.0}]
    cfg = make_config(train={"steps": 2}, reward={"rewards": rewards, "num_workers": 1})
    res = run_cli(cfg, "--quiet", timeout=900, env=UNIT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:   # 2 prompts x 4 samples a step
        assert r["reward/errors"] == 0 and r["reward/timeouts"] == 0
        assert r[f"reward/{kinds}:batch_len/mean"] == pytest.approx((3 * 3 + 3 * 3 + 2 * 2) / 8)  # batches 3, 3, 2
        assert r[f"reward/{kinds}:group_rank/mean"] == pytest.approx(40 + 1.5)   # rank 0..3 in groups of 4
        assert r[f"reward/{kinds}:async_flaky/mean"] == 1.0
        for name in ("reward_fixtures:ascii_start", f"{kinds}:plain_batch"):
            assert r[f"reward/{name}/failures"] == 0
            assert r[f"reward/{name}/latency_p99_ms"] >= r[f"reward/{name}/latency_p50_ms"] > 0


def test_kind_that_contradicts_the_function_fails_in_one_line(tmp_path, make_config):
    cfg = make_config(reward={"rewards": [{"name": "test_reward_kinds:group_rank", "kind": "batched"}]})
    res = run_cli(cfg, "--quiet", timeout=300, env=UNIT)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith("is decorated @reward.group")
    assert "Traceback" not in res.stderr
