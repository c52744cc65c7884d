"""Reward kinds: batched, group and async rewards beside per-completion ones, one registry, one failure semantics.

Each kind is tested for success, an exception, a hang, a wrong length / non-number and a dependency that is down,
in-process and in worker processes. Helper rewards are referenced as "<this module>:<function>", exactly as a
user's "mypkg.rewards:fn" from a config.
"""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import pytest

import reward
from reward import RewardRunner
from reward.registry import check_spec, kind_of

HERE = __name__


def ref(fn) -> str:
    return f"{HERE}:{fn.__name__}"


# -- helper rewards (importable by workers) -------------------------------------------------------------
@reward.batched
def batch_len(prompts, completions, **_):
    """Each completion scores the size of the batch it was scored in."""
    return [float(len(completions))] * len(completions)


@reward.batched
def batch_fields(prompts, completions, answer=None, scale=1.0, **_):
    assert isinstance(answer, list) and len(answer) == len(completions)
    return [scale * (c == a) for c, a in zip(completions, answer)]


@reward.batched
def batch_flaky(prompts, completions, **_):
    if "bad" in completions:
        raise RuntimeError("a bad batch")
    if "sleep" in completions:
        time.sleep(60)
    if "short" in completions:
        return [1.0] * (len(completions) - 1)
    if "refused" in completions:
        raise ConnectionRefusedError("[Errno 111] Connection refused")
    return [float("nan") if c == "nan" else 1.0 for c in completions]


def plain_batch(prompts, completions, **_):  # undecorated: batched only through the config's `kind`
    return [float(len(c)) for c in completions]


@reward.group
def group_rank(prompt, completions, **_):
    """Rank within the group (0 = shortest) and the group size, as rank + 10 * size."""
    order = sorted(range(len(completions)), key=lambda i: (len(completions[i]), i))
    ranks = [0] * len(completions)
    for r, i in enumerate(order):
        ranks[i] = r
    return [float(r + 10 * len(completions)) for r in ranks]


@reward.group
def group_flaky(prompt, completions, **_):
    if prompt == "bad":
        raise RuntimeError("a bad group")
    if prompt == "sleep":
        time.sleep(60)
    if prompt == "short":
        return [1.0]
    if prompt == "str":
        return "1.0"
    if prompt == "refused":
        raise ConnectionRefusedError("[Errno 111] Connection refused")
    return [None if c == "none" else 1.0 for c in completions]


@reward.group
def group_answer(prompt, completions, answer=None, **_):
    return [float(c == answer) for c in completions]


_INFLIGHT = [0, 0]  # now, peak (per process)


async def async_peak(prompt, completion, **_):
    """Scores the peak number of calls in flight seen so far in this process."""
    _INFLIGHT[0] += 1
    _INFLIGHT[1] = max(_INFLIGHT[1], _INFLIGHT[0])
    await asyncio.sleep(0.3)
    _INFLIGHT[0] -= 1
    return float(_INFLIGHT[1])


async def async_flaky(prompt, completion, **_):
    await asyncio.sleep(0.01)
    if completion == "bad":
        raise RuntimeError("async boom")
    if completion == "sleep":
        await asyncio.sleep(60)       # awaits: cancelled at the limit, the other calls go on
    if completion == "block":
        time.sleep(60)                # blocks the event loop: the worker is killed
    if completion == "str":
        return "1"
    if completion == "refused":
        raise ConnectionRefusedError("[Errno 111] Connection refused")
    return 1.0


@reward.group
async def async_group(prompt, completions, **_):
    await asyncio.sleep(0.01)
    if prompt == "bad":
        raise RuntimeError("async group boom")
    if prompt == "short":
        return [1.0]
    return [float(len(c)) for c in completions]


def sync_fn(prompt, completion, **_):
    return 1.0


def echo_pid(prompt, completion, **_):
    return float(os.getpid())


# -- kinds resolved without calling ---------------------------------------------------------------------
def test_kind_is_read_from_the_function_or_the_config_without_calling_it():
    assert kind_of(batch_len) == ("batched", False)
    assert kind_of(group_rank) == ("group", False)
    assert kind_of(async_flaky) == ("completion", True)
    assert kind_of(async_group) == ("group", True)
    assert kind_of(sync_fn) == ("completion", False)
    assert kind_of(plain_batch, "batched") == ("batched", False)
    with pytest.raises(ValueError, match="decorated @reward.group"):
        kind_of(group_rank, "batched", "x")
    with pytest.raises(ValueError, match="needs an `async def`"):
        kind_of(sync_fn, "async", "x")
    with pytest.raises(ValueError, match="unknown kind 'vectorised'"):
        check_spec({"name": ref(sync_fn), "kind": "vectorised"})
    runner = RewardRunner([ref(batch_len), ref(group_rank), ref(async_flaky), ref(async_group), ref(sync_fn)],
                          num_workers=0)
    assert list(runner.kinds().values()) == ["batched", "group", "async", "async group", "completion"]


def test_signature_is_checked_for_its_kind():
    def two_lists_only(prompts):  # not importable; checked only
        return []
    reward.registry._REGISTRY["_test_bad_sig"] = reward.batched(two_lists_only)
    try:
        with pytest.raises(ValueError, match=r"must take \(prompts, completions, \*\*fields\)"):
            check_spec({"name": "_test_bad_sig"})
    finally:
        del reward.registry._REGISTRY["_test_bad_sig"]


def test_config_entries_of_every_kind_pass_the_config_checks():
    from rl_lora.checks import check_rewards
    from rl_lora.config import ConfigError, _check_rewards

    entries = [{"name": ref(batch_len), "batch_size": 4}, {"name": ref(group_rank)},
               {"name": ref(async_flaky), "max_concurrency": 4, "timeout_s": 2},
               {"name": ref(plain_batch), "kind": "batched"}]
    _check_rewards(entries, "reward.rewards")
    check_rewards(SimpleNamespace(reward=SimpleNamespace(rewards=entries), adapters=[]))
    with pytest.raises(ConfigError, match="reward.rewards.0.: .*decorated @reward.group"):
        check_rewards(SimpleNamespace(reward=SimpleNamespace(rewards=[{"name": ref(group_rank), "kind": "batched"}]),
                                      adapters=[]))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        check_spec({"name": ref(batch_len), "batch_size": 0})


# -- batched ------------------------------------------------------------------------------------------
def test_batched_gets_lists_and_is_cut_by_batch_size():
    with RewardRunner([{"name": ref(batch_len), "batch_size": 2},
                       {"name": ref(batch_fields), "kwargs": {"scale": 2.0}}], num_workers=0) as runner:
        res = runner.score(["q"] * 5, ["a", "b", "c", "d", "e"], [{"answer": a} for a in "abxdx"])
    assert res.per_reward[ref(batch_len)] == [2.0, 2.0, 2.0, 2.0, 1.0]
    assert res.per_reward[ref(batch_fields)] == [2.0, 2.0, 0.0, 2.0, 0.0]
    assert res.errors == 0 and res.failed == [False] * 5


def test_batched_undecorated_function_through_config_kind():
    with RewardRunner([{"name": ref(plain_batch), "kind": "batched"}], num_workers=0) as runner:
        res = runner.score(["q"] * 2, ["ab", "abcd"], None)
    assert res.per_reward[ref(plain_batch)] == [2.0, 4.0]


@pytest.mark.parametrize("bad,errors,timeouts", [("bad", 2, 0), ("short", 2, 0), ("refused", 2, 0),
                                                 ("nan", 1, 0), ("sleep", 0, 2)])
def test_batched_failure_costs_only_its_batch(bad, errors, timeouts, caplog):
    comps = ["ok", bad, "ok", "ok", "ok"]
    with RewardRunner([{"name": ref(batch_flaky), "batch_size": 2}, {"name": ref(batch_len), "weight": 0}],
                      timeout_s=1.0, num_workers=0) as runner:
        res = runner.score(["q"] * 5, comps, None)
    lost = [True, True, False, False, False] if bad != "nan" else [False, True, False, False, False]
    assert res.failed == lost
    assert res.errors == errors and res.timeouts == timeouts
    assert [v for v, f in zip(res.per_reward[ref(batch_flaky)], lost) if not f] == [1.0] * lost.count(False)
    assert res.metrics[f"reward/{ref(batch_flaky)}/failures"] == errors + timeouts
    assert any("batch_flaky" in r.getMessage() for r in caplog.records)


def test_batched_in_workers_hang_and_raise_cost_only_their_batches():
    with RewardRunner([{"name": ref(batch_flaky), "batch_size": 2}], timeout_s=1.0, num_workers=2) as runner:
        res = runner.score(["q"] * 6, ["ok", "sleep", "bad", "ok", "ok", "ok"], None)
        assert res.failed == [True, True, True, True, False, False]
        assert res.timeouts == 2 and res.errors == 2
        res = runner.score(["q"] * 2, ["ok", "ok"], None)   # the killed worker was replaced
        assert res.failed == [False, False] and res.rewards == [1.0, 1.0]


# -- group --------------------------------------------------------------------------------------------
def test_group_gets_one_prompts_completions():
    comps = ["aaa", "a", "aa", "b", "bbbb"]
    with RewardRunner([ref(group_rank)], num_workers=0) as runner:
        by_prompt = runner.score(["p", "p", "p", "q", "q"], comps, None)
        by_ids = runner.score(["p"] * 5, comps, None, group_ids=[7, 7, 7, 8, 8])
        by_size = runner.score(["x"] * 4, comps[:4], None, group_size=2)
    assert by_prompt.per_reward[ref(group_rank)] == [32.0, 30.0, 31.0, 20.0, 21.0]
    assert by_ids.rewards == by_prompt.rewards
    assert by_size.rewards == [21.0, 20.0, 21.0, 20.0]
    with pytest.raises(ValueError, match="group_size 3 does not divide 4"):
        runner.score(["x"] * 4, comps[:4], None, group_size=3)


def test_group_fields_are_the_groups_example():
    with RewardRunner([ref(group_answer)], num_workers=0) as runner:
        res = runner.score(["p", "p", "q", "q"], ["1", "2", "1", "2"],
                           [{"answer": "1"}, {"answer": "1"}, {"answer": "2"}, {"answer": "2"}])
    assert res.rewards == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("bad,errors,timeouts", [("bad", 2, 0), ("short", 2, 0), ("str", 2, 0),
                                                 ("refused", 2, 0), ("sleep", 0, 2)])
def test_group_failure_costs_only_its_group(bad, errors, timeouts):
    with RewardRunner([ref(group_flaky)], timeout_s=1.0, num_workers=0) as runner:
        res = runner.score(["ok", "ok", bad, bad, "ok", "ok"], ["x"] * 6, None)
    assert res.failed == [False, False, True, True, False, False]
    assert res.errors == errors and res.timeouts == timeouts
    assert res.rewards == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_group_none_entry_costs_only_that_completion():
    with RewardRunner([ref(group_flaky)], num_workers=0) as runner:
        res = runner.score(["ok"] * 3, ["x", "none", "x"], None)
    assert res.failed == [False, True, False] and res.errors == 1


def test_group_in_workers():
    with RewardRunner([ref(group_flaky), {"name": ref(echo_pid), "weight": 0}], timeout_s=1.0,
                      num_workers=2) as runner:
        res = runner.score(["ok", "ok", "sleep", "sleep", "bad", "bad"], ["x"] * 6, None)
        assert res.failed == [False, False, True, True, True, True]
        assert res.timeouts == 2 and res.errors == 2
        assert res.per_reward[ref(echo_pid)][0] != os.getpid()


# -- async --------------------------------------------------------------------------------------------
def test_async_calls_are_awaited_concurrently_up_to_the_limit():
    with RewardRunner([{"name": ref(async_peak), "max_concurrency": 3}], timeout_s=5.0, num_workers=1) as runner:
        res = runner.score(["q"] * 9, ["x"] * 9, None)
    assert res.errors == 0 and res.timeouts == 0
    assert max(res.rewards) == 3.0   # three in flight at once, never more


@pytest.mark.parametrize("num_workers", [0, 1])
def test_async_failures_cost_only_their_call(num_workers):
    comps = ["ok", "bad", "sleep", "str", "refused", "ok"]
    with RewardRunner([{"name": ref(async_flaky), "max_concurrency": 8}], timeout_s=0.5,
                      num_workers=num_workers) as runner:
        res = runner.score(["q"] * 6, comps, None)
    assert res.failed == [False, True, True, True, True, False]
    assert res.timeouts == 1 and res.errors == 3
    assert res.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_async_call_that_blocks_the_loop_costs_its_chunk_and_the_worker_is_replaced():
    with RewardRunner([{"name": ref(async_flaky), "max_concurrency": 2}], timeout_s=0.5, num_workers=1) as runner:
        res = runner.score(["q"] * 4, ["ok", "block", "ok", "ok"], None)
        assert res.failed == [True, True, False, False] and res.timeouts == 2
        res = runner.score(["q"] * 2, ["ok", "ok"], None)
        assert res.failed == [False, False]


def test_async_group():
    with RewardRunner([ref(async_group)], num_workers=0) as runner:
        res = runner.score(["p", "p", "bad", "bad", "short", "short"], ["a", "bb", "x", "x", "y", "y"], None)
    assert res.rewards[:2] == [1.0, 2.0] and res.failed == [False, False, True, True, True, True]


def test_sync_function_declared_async_in_config_is_refused():
    with pytest.raises(ValueError, match="needs an `async def`"):
        RewardRunner([{"name": ref(sync_fn), "kind": "async"}], num_workers=0)


# -- metrics and the trainer's call -------------------------------------------------------------------
def test_metrics_per_reward():
    with RewardRunner([ref(group_flaky), {"name": ref(plain_batch), "kind": "batched", "weight": 0}],
                      num_workers=0) as runner:
        res = runner.score(["p", "p", "q", "q", "bad", "bad"], ["a", "abc", "ab", "ab", "x", "x"], None)
    m = res.metrics
    k = ref(plain_batch)
    assert m[f"reward/{k}/mean"] == pytest.approx(sum([1, 3, 2, 2, 1, 1]) / 6)
    assert m[f"reward/{k}/std_in_group"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)   # groups p, q, bad
    assert m[f"reward/{k}/failures"] == 0
    assert m[f"reward/{ref(group_flaky)}/failures"] == 2
    assert m[f"reward/{ref(group_flaky)}/mean"] == 1.0      # over the scored completions only
    assert 0 <= m[f"reward/{k}/latency_p50_ms"] <= m[f"reward/{k}/latency_p99_ms"]


def test_score_completions_passes_each_group_as_one():
    """Two groups with the same prompt text (the same problem sampled twice) must stay two groups."""
    from rl_lora.loop import score_completions

    problems = [SimpleNamespace(answer="1", fields={})]
    groups = [SimpleNamespace(prompt="same", problem_index=0, completions=[SimpleNamespace(text=t) for t in ts])
              for ts in (["a", "aa"], ["b", "bb"])]
    with RewardRunner([ref(group_rank)], num_workers=0) as runner:
        scored = score_completions([runner], groups, [problems])
    assert scored.rewards == [20.0, 21.0, 20.0, 21.0]
    assert f"reward/{ref(group_rank)}/mean" in scored.metrics_K[0]


def test_adapters_sharing_a_runner_are_scored_in_one_round_as_if_apart():
    """K adapters with the same rewards: one `score` round for all (issue 18), and each adapter's rewards, failures
    and metrics are those of scoring its completions alone (latencies aside: the round's)."""
    from rl_lora.loop import score_completions

    problems = [SimpleNamespace(answer="1", fields={})]
    texts_K = [(["a", "aa"], ["b", "bb", "bbb"]), (["c"] * 2, ["d", "dd"]), (["e", "eee"], ["f", "ff"])]
    prompts_K = [("p", "q"), ("bad", "q"), ("p", "bad")]  # group_flaky raises on the "bad" prompt
    groups = [SimpleNamespace(prompt=p, problem_index=0, completions=[SimpleNamespace(text=t) for t in ts])
              for texts, prompts in zip(texts_K, prompts_K) for ts, p in zip(texts, prompts)]
    with RewardRunner([ref(group_rank), ref(group_flaky)], num_workers=0) as runner:
        rounds = []
        score = runner.score
        runner.score = lambda *a, **kw: rounds.append(1) or score(*a, **kw)
        scored = score_completions([runner] * 3, groups, [problems] * 3)
        assert len(rounds) == 1
        alone = [score_completions([runner], groups[2 * k: 2 * k + 2], [problems]) for k in range(3)]
    assert scored.rewards == [r for a in alone for r in a.rewards]
    assert scored.failed == [f for a in alone for f in a.failed] and any(scored.failed)
    assert scored.errors == sum(a.errors for a in alone) == 4 and scored.timeouts == 0
    for k in range(3):
        assert {m: v for m, v in scored.metrics_K[k].items() if "latency" not in m} == \
            {m: v for m, v in alone[k].metrics_K[0].items() if "latency" not in m}


def test_group_length_correctness_prefers_shorter_right_answers():
    comps = [r"\boxed{2}", r"so the answer is \boxed{2}", "no idea", r"\boxed{2} hmm", r"\boxed{3}", r"\boxed{2}"]
    with RewardRunner([{"name": "group_length_correctness", "kwargs": {"alpha": 0.5}}], num_workers=0) as runner:
        assert runner.kinds() == {"group_length_correctness": "group"}
        res = runner.score(["p"] * 4 + ["q"] * 2, comps, [{"answer": "2"}] * 4 + [{"answer": "3"}] * 2)
        span = len(comps[1]) - len(comps[0])
        assert res.rewards == pytest.approx([1.0, 0.5, 0.0, 1.0 - 0.5 * (len(comps[3]) - len(comps[0])) / span,
                                             1.0, 0.0])
        res = runner.score(["p"] * 2, ["a", "b"], [{}] * 2)       # no answer field: the group's call fails
        assert res.failed == [True, True] and res.errors == 2
