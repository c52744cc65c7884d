"""The loop's pure stages without a model: group assembly (K adapters, tenants with their own data), staleness,
the guards that stop a broken run, step metrics and the `<name>/` prefix added once at the logging boundary."""

from types import SimpleNamespace

import pytest

from rl_lora.loop import (
    Scored,
    Streak,
    assemble_groups,
    check_learned,
    check_scored,
    check_staleness,
    is_due,
    loaded_position,
    saved_position,
    staleness,
    step_metrics,
    with_names,
)
from rl_lora.policy import lora_id, version_of
from rl_lora.rollout import Completion
from rl_lora.sync import RunError


def _task(tag, n=6):
    return SimpleNamespace(train=[SimpleNamespace(question=f"{tag}{i}") for i in range(n)],
                           train_prompts=[[ord(tag), i] for i in range(n)])


def _completions(n, version=1, length=3, finish="stop"):
    return [Completion([7] * length, [-1.0] * length, "x", finish, version) for _ in range(n)]


def test_groups_are_adapter_major_and_each_adapter_reads_its_own_dataset():
    tasks = [_task("a"), _task("b")]
    idx_D = [[4, 1], [0, 5]]
    task_of_K = [0, 1, 0]  # adapter 1 is a tenant with its own data; adapters 0 and 2 share the run's
    completions = [_completions(2) for _ in range(6)]
    groups = assemble_groups(completions, idx_D, tasks, task_of_K)
    assert [(g.adapter, g.prompt) for g in groups] == [(0, "a4"), (0, "a1"), (1, "b0"), (1, "b5"), (2, "a4"),
                                                       (2, "a1")]
    assert [g.prompt_ids for g in groups[2:4]] == [[ord("b"), 0], [ord("b"), 5]]
    assert all(g.completions is c for g, c in zip(groups, completions))


def test_staleness_counts_versions_behind_through_the_policys_id_scheme():
    K = 2
    groups = assemble_groups([[c] for c in (_completions(1, lora_id(3, K, 0)) + _completions(1, lora_id(2, K, 1)))],
                             [[0]], [_task("a")], [0, 0])
    lag = staleness(4, groups, lambda a, submitted: version_of(a, K, submitted), submitted=3)
    assert lag == 2
    check_staleness(lag, 2, step=5)
    with pytest.raises(RunError, match="step 5 was sampled 2 versions behind .*max_staleness=1"):
        check_staleness(lag, 1, step=5)
    # full fine-tuning: no adapter id, the version live at submission
    assert staleness(4, [SimpleNamespace(completions=_completions(2, 0))], lambda a, s: s, submitted=4) == 0


def _scored(rewards, failed=None, timeouts=0, errors=0, metrics_K=None):
    failed = failed or [False] * len(rewards)
    return Scored(list(rewards), list(rewards), timeouts, errors, len(rewards), failed, metrics_K or [{}])


def test_reward_guard_stops_after_the_configured_streak_only():
    streak = Streak(2)
    broken = _scored([0.0, 0.0], failed=[True, True], errors=2)
    check_scored(broken, streak, step=1)
    check_scored(_scored([1.0, 0.0]), streak, step=2)  # a good step resets the count
    check_scored(broken, streak, step=3)
    with pytest.raises(RunError, match="every reward call failed or timed out in 2 steps in a row .*step 4"):
        check_scored(broken, streak, step=4)
    never = Streak(0)
    for step in range(5):
        check_scored(broken, never, step)


def test_skipped_steps_are_reported_not_pushed_and_stop_the_run_at_the_limit():
    said, streak = [], Streak(2)
    assert check_learned({"loss/skipped": 0.0}, streak, 1, said.append) is True
    assert check_learned({}, streak, 2, said.append) is False  # nothing to learn: no push, not a skip
    assert check_learned({"loss/skipped": 1.0}, streak, 3, said.append) is False
    assert said and "step 3: non-finite" in said[0]
    with pytest.raises(RunError, match="2 steps in a row had a non-finite loss"):
        check_learned({"loss/skipped": 1.0}, streak, 4, said.append)


def _groups(K, P=2, G=2):
    return [SimpleNamespace(completions=_completions(G, length=2 + k, finish="length" if k else "stop"), adapter=k)
            for k in range(K) for _ in range(P)]


def test_one_adapters_metrics_are_the_runs_without_a_prefix():
    groups = _groups(1)
    scored = _scored([1.0, 0.0, 1.0, 1.0], metrics_K=[{"reward/math_answer/mean": 0.75}])
    total, per_K = step_metrics(groups, scored, kept=groups[:1], dropped_for_failure=0, K=1)
    m = with_names(total, per_K, ["adapter"])
    assert m["reward/mean"] == 0.75 and m["reward/math_answer/mean"] == 0.75
    assert m["groups/kept"] == 1.0 and m["groups/dropped"] == 1.0 and m["response/truncated"] == 0.0
    assert not any("/" in k and k.split("/")[0] == "adapter" for k in m)


def test_several_adapters_get_their_name_once_beside_the_totals():
    groups = _groups(2)
    scored = _scored([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                     metrics_K=[{"reward/r/mean": 1.0}, {"reward/r/mean": 0.25}])
    total, per_K = step_metrics(groups, scored, kept=groups, dropped_for_failure=0, K=2)
    learn_K = [{"loss/pg": 0.5}, {"loss/pg": -0.1}]
    m = with_names({**total, "loss/pg": 0.4}, [{**a, **b} for a, b in zip(per_K, learn_K)], ["x", "y"])
    assert m["reward/mean"] == 5 / 8 and m["x/reward/mean"] == 1.0 and m["y/reward/mean"] == 0.25
    assert m["x/reward/r/mean"] == 1.0 and m["y/reward/r/mean"] == 0.25 and "reward/r/mean" not in m
    assert m["loss/pg"] == 0.4 and m["x/loss/pg"] == 0.5 and m["y/loss/pg"] == -0.1
    assert m["response/truncated"] == 0.5 and m["response/length_mean"] == 2.5
    assert not any(k.startswith(("x/x/", "y/y/")) for k in m)


def test_checkpoint_positions_and_schedules():
    assert saved_position([8]) == 8 and saved_position([8, 3]) == [8, 3]
    assert loaded_position(8) == [8] and loaded_position([8, 3]) == [8, 3]
    assert [s for s in range(1, 7) if is_due(s, 3)] == [3, 6] and not any(is_due(s, 0) for s in range(1, 7))
