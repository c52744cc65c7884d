"""reward.registry / reward.runner: resolving rewards, RewardRunner in-process and in workers, failure semantics.

The helper rewards below are referenced as "<this module>:<function>", so worker processes import them by
name exactly as they would a user's "mypkg.rewards:fn".
"""

from __future__ import annotations

import logging
import math
import os
import time

import pytest

from reward import RewardResult, RewardRunner, RewardSpec, resolve
from reward.registry import boxed_format, math_answer

HERE = __name__


# -- helper rewards (importable by workers) -------------------------------------------------------------
def length_penalty(prompt, completion, target=10, **_):
    return -abs(len(completion) - target) / target


def sleepy(prompt, completion, seconds=30.0, **_):
    if completion == "sleep":
        time.sleep(seconds)
    return 1.0


def busy_loop(prompt, completion, **_):
    while True:  # pure-Python infinite loop; only killing the worker / SIGALRM stops it
        pass


def raises(prompt, completion, **_):
    raise RuntimeError("boom")


def returns_nan(prompt, completion, **_):
    return float("nan")


def returns_none(prompt, completion, **_):
    return None


def returns_str(prompt, completion, **_):
    return "1.0"


def returns_inf(prompt, completion, **_):
    return math.inf


def exits(prompt, completion, **_):
    raise SystemExit(1)


def dies(prompt, completion, **_):
    os._exit(3)


def only_answer(prompt, completion, answer):  # no **kwargs: gets only the fields it names
    return 1.0 if completion == answer else 0.0


def echo_pid(prompt, completion, **_):
    return float(os.getpid())


def swallow_everything(prompt, completion, **_):
    try:
        time.sleep(30)
    except Exception:  # a reward that catches Exception must still be stopped
        return 1.0
    return 1.0


def ref(fn) -> str:
    return f"{HERE}:{fn.__name__}"


# -- resolve / specs ------------------------------------------------------------------------------------
def test_resolve_builtins_and_custom():
    assert resolve("math_answer") is math_answer
    assert resolve("boxed_format") is boxed_format
    assert resolve(ref(length_penalty)) is length_penalty
    assert resolve("os.path:join") is os.path.join


@pytest.mark.parametrize("name, fragment", [
    ("no_such_reward", "unknown reward 'no_such_reward'"),
    ("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
    ("os.path:no_such_fn", "has no attribute 'no_such_fn'"),
    ("os:sep", "is not callable"),
    (":fn", "expected 'package.module:function'"),
])
def test_resolve_errors(name, fragment):
    with pytest.raises(ValueError) as exc:
        resolve(name)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def test_runner_validates_eagerly():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardRunner([{"name": "math_answer"}, {"name": "nope"}], num_workers=0)
    with pytest.raises(ValueError, match="unknown key 'weigth'"):
        RewardRunner([{"name": "math_answer", "weigth": 1.0}], num_workers=0)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        RewardRunner([{"name": "math_answer", "weight": "high"}], num_workers=0)
    with pytest.raises(ValueError, match="must accept"):
        RewardRunner([{"name": "os.path:basename"}], num_workers=0)
    with pytest.raises(ValueError):
        RewardRunner([], num_workers=0)


def test_spec_coercion():
    assert RewardSpec.coerce({"name": "math_answer"}) == RewardSpec("math_answer", 1.0, {})
    assert RewardSpec.coerce("boxed_format") == RewardSpec("boxed_format")
    s = RewardSpec.coerce({"name": "x:y", "weight": 2, "kwargs": {"target": 3}})
    assert s.weight == 2.0 and s.kwargs == {"target": 3}


# -- in-process runner ----------------------------------------------------------------------------------
def test_builtins_and_weighted_combination():
    specs = [{"name": "math_answer", "weight": 1.0}, RewardSpec("boxed_format", 0.5),
             {"name": ref(length_penalty), "weight": 0.1, "kwargs": {"target": 10}}]
    completions = [r"\boxed{42}", "42", r"\boxed{41}", r"\boxed{42"]
    with RewardRunner(specs, num_workers=0) as runner:
        res = runner.score(["q"] * 4, completions, [{"answer": "42"}] * 4)
    assert isinstance(res, RewardResult)
    assert res.per_reward["math_answer"] == [1.0, 1.0, 0.0, 0.0]
    assert res.per_reward["boxed_format"] == [1.0, 0.0, 1.0, 0.0]
    lp = [length_penalty("q", c, target=10) for c in completions]
    assert res.per_reward[ref(length_penalty)] == pytest.approx(lp)
    expected = [1.0 * m + 0.5 * b + 0.1 * p for m, b, p in zip([1, 1, 0, 0], [1, 0, 1, 0], lp)]
    assert res.rewards == pytest.approx(expected)
    assert res.timeouts == 0 and res.errors == 0


def test_same_reward_twice_gets_distinct_keys():
    with RewardRunner(["boxed_format", {"name": "boxed_format", "weight": 2}], num_workers=0) as runner:
        res = runner.score(["q"], [r"\boxed{1}"], [{}])
    assert set(res.per_reward) == {"boxed_format", "boxed_format#2"}
    assert res.rewards == [3.0]


def test_kwargs_filtered_for_functions_without_var_kwargs():
    with RewardRunner([ref(only_answer)], num_workers=0) as runner:
        res = runner.score(["q", "q"], ["7", "8"], [{"answer": "7", "level": 3}, {"answer": "7", "level": 1}])
    assert res.rewards == [1.0, 0.0] and res.errors == 0


@pytest.mark.parametrize("bad", [raises, returns_nan, returns_none, returns_str, returns_inf, exits])
def test_failing_rewards_score_zero_and_are_counted(bad, caplog):
    specs = [{"name": "math_answer"}, {"name": ref(bad), "weight": 1.0}]
    with caplog.at_level(logging.WARNING, logger="reward.runner"):
        with RewardRunner(specs, num_workers=0) as runner:
            res = runner.score(["q"] * 3, [r"\boxed{1}"] * 3, [{"answer": "1"}] * 3)
    assert res.errors == 3 and res.timeouts == 0
    assert res.per_reward[ref(bad)] == [0.0, 0.0, 0.0]
    assert res.rewards == [1.0, 1.0, 1.0]          # the other reward still counts
    assert any(bad.__name__ in r.getMessage() for r in caplog.records)


def test_math_answer_without_answer_field_is_an_error():
    with RewardRunner(["math_answer"], num_workers=0) as runner:
        res = runner.score(["q"], [r"\boxed{1}"], [{}])
    assert res.errors == 1 and res.rewards == [0.0]


def test_inline_timeout():
    specs = [{"name": ref(sleepy), "kwargs": {"seconds": 10}}, {"name": ref(swallow_everything), "weight": 0.0}]
    with RewardRunner(specs[:1], timeout_s=0.3, num_workers=0) as runner:
        t0 = time.perf_counter()
        res = runner.score(["q", "q"], ["sleep", "fine"], [{}, {}])
        assert time.perf_counter() - t0 < 3
    assert res.timeouts == 1 and res.rewards == [0.0, 1.0]
    with RewardRunner(specs[1:], timeout_s=0.3, num_workers=0) as runner:
        res = runner.score(["q"], ["x"], [{}])
    assert res.timeouts == 1


def test_length_mismatch_raises():
    with RewardRunner(["boxed_format"], num_workers=0) as runner:
        with pytest.raises(ValueError):
            runner.score(["q"], ["a", "b"], [{}, {}])


# -- worker processes -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool_runner():
    specs = [{"name": "math_answer"}, {"name": "boxed_format", "weight": 0.5},
             {"name": ref(sleepy), "weight": 0.0, "kwargs": {"seconds": 60}}]
    runner = RewardRunner(specs, timeout_s=1.0, num_workers=2)
    yield runner
    runner.close()


def test_pool_scores_like_inline(pool_runner):
    completions = [r"\boxed{\frac12}", r"\boxed{0.4}", "The answer is 0.5", r"\boxed{1/2"]
    res = pool_runner.score(["q"] * 4, completions, [{"answer": "0.5"}] * 4)
    assert res.per_reward["math_answer"] == [1.0, 0.0, 1.0, 0.0]
    assert res.rewards == [1.5, 0.5, 1.0, 0.0]
    assert res.timeouts == 0 and res.errors == 0


def test_pool_timeout_kills_worker_and_keeps_working(pool_runner):
    t0 = time.perf_counter()
    res = pool_runner.score(["q"] * 3, ["sleep", r"\boxed{2}", "sleep"], [{"answer": "2"}] * 3)
    elapsed = time.perf_counter() - t0
    assert res.timeouts == 2 and res.errors == 0
    assert res.per_reward[ref(sleepy)] == [0.0, 1.0, 0.0]
    assert res.per_reward["math_answer"] == [0.0, 1.0, 0.0]   # the other rewards of a timed-out row still count
    assert elapsed < 10
    # the pool recovered: fresh workers answer the next batch
    res = pool_runner.score(["q"] * 4, [r"\boxed{2}"] * 4, [{"answer": "2"}] * 4)
    assert res.timeouts == 0 and res.per_reward["math_answer"] == [1.0] * 4


def test_pool_busy_loop_and_worker_death():
    specs = [{"name": ref(busy_loop)}, {"name": ref(dies)}, {"name": ref(echo_pid), "weight": 0.0}]
    with RewardRunner(specs, timeout_s=0.5, num_workers=1) as runner:
        res = runner.score(["q"], ["x"], [{}])
        assert res.timeouts == 1 and res.errors == 1
        pid = res.per_reward[ref(echo_pid)][0]
        assert pid > 0 and pid != os.getpid()      # really ran in another process
        res = runner.score(["q", "q"], ["x", "y"], [{}, {}])
        assert res.timeouts == 2 and res.errors == 2


def test_pool_failure_semantics():
    specs = [{"name": ref(raises)}, {"name": ref(returns_nan)}, {"name": ref(returns_none)},
             {"name": "math_answer", "weight": 2.0}]
    with RewardRunner(specs, timeout_s=5.0, num_workers=1) as runner:
        res = runner.score(["q"], [r"\boxed{3}"], [{"answer": "3"}])
    assert res.errors == 3 and res.timeouts == 0 and res.rewards == [2.0]


def test_close_is_idempotent():
    runner = RewardRunner(["boxed_format"], num_workers=1)
    runner.close()
    runner.close()


def flaky(prompt, completion, **_):
    if completion == "bad":
        raise RuntimeError("flaky")
    return 1.0


def test_failed_marks_exactly_the_completions_whose_weighted_reward_failed():
    """A trainer drops these instead of learning from a made-up 0; a failing zero-weight (diagnostic) reward does
    not make the weighted score wrong, so it does not mark the completion."""
    specs = [{"name": ref(flaky)}, {"name": ref(sleepy), "weight": 0.5, "kwargs": {"seconds": 10}},
             {"name": ref(returns_nan), "weight": 0.0}]
    with RewardRunner(specs, timeout_s=0.3, num_workers=0) as runner:
        res = runner.score(["q"] * 4, ["ok", "bad", "sleep", "fine"], [{}] * 4)
    assert res.failed == [False, True, True, False]
    assert res.errors == 5 and res.timeouts == 1  # 4 NaNs of the zero-weight reward + 1 raise; 1 timeout
    assert res.rewards == [1.5, 0.5, 1.0, 1.5]


def test_pool_marks_failed_completions():
    specs = [{"name": ref(flaky)}, {"name": "boxed_format"}]
    with RewardRunner(specs, timeout_s=5.0, num_workers=1) as runner:
        res = runner.score(["q"] * 3, ["bad", r"\boxed{1}", "bad"], [{}] * 3)
    assert res.failed == [True, False, True] and res.errors == 2
